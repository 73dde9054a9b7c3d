"""Executors: where a batch runs (worker processes, threads, inline, a Dask cluster)."""

from .process import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor, check_picklable

__all__ = ["Executor", "InlineExecutor", "ProcessExecutor", "ThreadExecutor", "check_picklable"]
