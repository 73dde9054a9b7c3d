"""microbatch: streaming micro-batch processing on anyio.

Records from a file, a growing log, a TCP socket or any iterable are cut into batches bounded by
size and time, run through worker processes with backpressure, timeouts and retries, and folded in
order into a running result that checkpoints make exactly-once across crashes.

The public names are imported on first use: a worker process that only needs the line splitter and
the batch task does not pay for anyio, the pipeline and the sources (about 0.1 s and 12 MB each).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._exceptions import (
    BackendNotSupported,
    BatcherClosed,
    BatcherError,
    BatcherFull,
    BatchFailed,
    BatchResultMismatch,
    BatchTimeout,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointFinished,
    CheckpointMismatch,
    CheckpointWriteError,
    ExecutorError,
    ExecutorUnavailable,
    LineTooLong,
    MicrobatchError,
    PathNotVisible,
    RemoteError,
    RemoteTraceback,
    ResultTooLarge,
    SourceDecodeError,
    SourceError,
    TooManyDeadLetters,
    UnpicklableFunction,
    WorkerCrashed,
)

if TYPE_CHECKING:
    from ._batching import ChunkedSource, batches
    from .aggregate import (
        Aggregates,
        Aggregator,
        ByKey,
        Count,
        KeyedWindow,
        Max,
        Mean,
        Min,
        Reduce,
        Sum,
        TopK,
        WindowResult,
        Windows,
    )
    from .checkpoints.directory import DirectoryStore
    from .checkpoints.format import Checkpoint
    from .checkpoints.sqlite import SqliteStore
    from .checkpoints.store import CheckpointStore
    from .executors import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor
    from .executors.dask import DaskExecutor
    from .pipeline import Pipeline, Run, Stats, Update
    from .service import Batcher, BatcherStats, BatchExecutor, PendingResult
    from .sources import (
        Chunk,
        LineSource,
        ManyFiles,
        NatsStream,
        Source,
        TcpLines,
        nats_stream,
        read_files,
        read_lines,
        tcp_lines,
    )

_LAZY = {
    "._batching": ["ChunkedSource", "batches"],
    ".checkpoints.format": ["Checkpoint"],
    ".checkpoints.store": ["CheckpointStore"],
    ".checkpoints.directory": ["DirectoryStore"],
    ".checkpoints.sqlite": ["SqliteStore"],
    ".executors.dask": ["DaskExecutor"],
    ".aggregate": [
        "Aggregates", "Aggregator", "ByKey", "Count", "KeyedWindow", "Max", "Mean", "Min", "Reduce", "Sum",
        "TopK", "WindowResult", "Windows",
    ],
    ".executors": ["Executor", "InlineExecutor", "ProcessExecutor", "ThreadExecutor"],
    ".pipeline": ["Pipeline", "Run", "Stats", "Update"],
    ".service": ["Batcher", "BatcherStats", "BatchExecutor", "PendingResult"],
    ".sources": [
        "Chunk",
        "LineSource",
        "ManyFiles",
        "NatsStream",
        "Source",
        "TcpLines",
        "nats_stream",
        "read_files",
        "read_lines",
        "tcp_lines",
    ],
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__version__ = "0.1.0"

__all__ = [
    "Aggregates",
    "Aggregator",
    "BackendNotSupported",
    "Batcher",
    "BatcherClosed",
    "BatcherError",
    "BatcherFull",
    "BatcherStats",
    "BatchExecutor",
    "ByKey",
    "BatchFailed",
    "BatchResultMismatch",
    "BatchTimeout",
    "Checkpoint",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointMismatch",
    "CheckpointFinished",
    "CheckpointStore",
    "CheckpointWriteError",
    "Chunk",
    "ChunkedSource",
    "Count",
    "DaskExecutor",
    "DirectoryStore",
    "Executor",
    "ExecutorError",
    "ExecutorUnavailable",
    "InlineExecutor",
    "KeyedWindow",
    "LineSource",
    "LineTooLong",
    "ManyFiles",
    "Max",
    "Mean",
    "MicrobatchError",
    "Min",
    "NatsStream",
    "PathNotVisible",
    "PendingResult",
    "Pipeline",
    "ProcessExecutor",
    "Reduce",
    "RemoteError",
    "ResultTooLarge",
    "RemoteTraceback",
    "Run",
    "SourceDecodeError",
    "Source",
    "SourceError",
    "SqliteStore",
    "Stats",
    "Sum",
    "TcpLines",
    "ThreadExecutor",
    "TooManyDeadLetters",
    "TopK",
    "UnpicklableFunction",
    "Update",
    "WindowResult",
    "Windows",
    "WorkerCrashed",
    "batches",
    "nats_stream",
    "read_files",
    "read_lines",
    "tcp_lines",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'microbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The public names only (not the helpers this module imports for itself)."""
    return sorted([*__all__, "__version__"])
