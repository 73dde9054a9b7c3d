"""microbatch: streaming micro-batch processing on anyio.

Records from a file, a growing log, a TCP socket or any iterable are cut into batches bounded by
size and time, run through worker processes with backpressure, timeouts and retries, and folded in
order into a running result that checkpoints make exactly-once across crashes.
"""

from __future__ import annotations

from ._batching import ChunkedSource, batches
from ._checkpoint import Checkpoint, CheckpointStore, DirectoryStore, SqliteStore
from ._dask import DaskExecutor
from ._exceptions import (
    BackendNotSupported,
    BatcherClosed,
    BatcherError,
    BatcherFull,
    BatchFailed,
    BatchTimeout,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointMismatch,
    CheckpointWriteError,
    ExecutorError,
    LineTooLong,
    MicrobatchError,
    RemoteError,
    RemoteTraceback,
    SourceDecodeError,
    SourceError,
    UnpicklableFunction,
    WorkerCrashed,
)

# Each public module adds its names below.
from .aggregate import Aggregator, Count, Max, Mean, Min, Reduce, Sum, TopK
from .executors import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor
from .pipeline import Pipeline, Stats, Update
from .service import Batcher, BatcherStats, BatchExecutor, PendingResult
from .sources import LineSource, TcpLines, read_lines, tcp_lines

__version__ = "0.1.0"

__all__ = [
    "Batcher",
    "BatcherStats",
    "BatchExecutor",
    "PendingResult",
    "Pipeline",
    "Stats",
    "Update",
    "batches",
    "ChunkedSource",
    "Aggregator",
    "Count",
    "Max",
    "Mean",
    "Min",
    "Reduce",
    "Sum",
    "TopK",
    "Checkpoint",
    "CheckpointStore",
    "DirectoryStore",
    "SqliteStore",
    "DaskExecutor",
    "Executor",
    "InlineExecutor",
    "ProcessExecutor",
    "ThreadExecutor",
    "LineSource",
    "TcpLines",
    "read_lines",
    "tcp_lines",
    "BackendNotSupported",
    "BatcherClosed",
    "BatcherError",
    "BatcherFull",
    "BatchFailed",
    "BatchTimeout",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointMismatch",
    "CheckpointWriteError",
    "ExecutorError",
    "LineTooLong",
    "MicrobatchError",
    "RemoteError",
    "RemoteTraceback",
    "SourceDecodeError",
    "SourceError",
    "UnpicklableFunction",
    "WorkerCrashed",
]
