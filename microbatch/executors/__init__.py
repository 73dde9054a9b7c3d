"""Executors: where a batch runs (worker processes, threads, inline, a Dask cluster)."""

from .base import Executor, check_picklable
from .inline import InlineExecutor
from .process import ProcessExecutor
from .thread import ThreadExecutor

__all__ = ["Executor", "InlineExecutor", "ProcessExecutor", "ThreadExecutor", "check_picklable"]
