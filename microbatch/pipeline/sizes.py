"""The sizes a run reads with: a split's bytes and a batch's records, given or the defaults.

``Pipeline`` marks a ``split_size`` or ``max_size`` the user did not give with the int subclasses
below, so that a run can tell a default (which an executor, or a run with shard owners, may
replace) from the same number given on purpose.
"""

from __future__ import annotations

from typing import Any

from .._core.owners import SplitSizer
from .._core.params import check_int
from ..executors.dask import DEFAULT_SPLIT_SIZE, DaskExecutor
from .owned import owned_split_sizes

__all__ = ["UnsetMaxSize", "UnsetSplitSize", "read_sizes", "split_size_for"]


class UnsetSplitSize(int):
    """A ``split_size`` the user did not give: the pipeline's default, which an executor may replace."""


class UnsetMaxSize(int):
    """A ``max_size`` the user did not give: the pipeline's default, which a run with shard owners
    replaces inside splits (see :func:`read_sizes`)."""


def read_sizes(pipeline: Any, owned: bool) -> tuple[int | SplitSizer | None, int | None]:
    """The split size a run reads a file with, and the lines per batch inside a split (None:
    ``max_size``); a run with shard owners replaces the defaults (:func:`owned_split_sizes`: the
    split size may then follow the keys, a :class:`SplitSizer`)."""
    size = split_size_for(pipeline.split_size, pipeline.executor)
    if not owned:
        return size, None
    # The pipeline's default, or a Dask executor's (large for few tasks; with owners, a task's
    # result is a receipt, and smaller splits spread a file over more workers).
    unset = type(pipeline.split_size) is UnsetSplitSize
    default_size = unset and size in (pipeline.split_size, DEFAULT_SPLIT_SIZE)
    return owned_split_sizes(
        size, default_size, type(pipeline.max_size) is UnsetMaxSize,
        adapt=not isinstance(pipeline.executor, DaskExecutor),
    )


def split_size_for(split_size: int | None, executor: object) -> int | None:
    """The split size a run uses: ``split_size`` when given (an int or None), else the executor's
    ``split_size`` attribute when it has one (a remote executor wants larger splits)."""
    if not isinstance(split_size, UnsetSplitSize):
        return split_size
    preferred = getattr(executor, "split_size", None)
    return int(split_size) if preferred is None else check_int("executor.split_size", preferred, minimum=1)
