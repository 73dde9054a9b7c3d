"""The public face: exactly the documented names, each importable; workers stay light."""

from __future__ import annotations

import subprocess
import sys

import microbatch as mb

DOCUMENTED = {
    # batching and sources
    "batches", "ChunkedSource", "read_lines", "tcp_lines", "LineSource", "TcpLines",
    "nats_stream", "NatsStream", "read_files", "ManyFiles",
    # the source protocol: a source that resumes from its own positions
    "Source", "Chunk",
    # pipelines
    "Pipeline", "Run", "Stats", "Update",
    # aggregators
    "Aggregator", "Sum", "Count", "Mean", "Min", "Max", "TopK", "Reduce", "ByKey",
    "Aggregates", "Windows", "WindowResult", "KeyedWindow",
    # executors
    "Executor", "ProcessExecutor", "ThreadExecutor", "InlineExecutor", "DaskExecutor",
    # checkpoints
    "Checkpoint", "CheckpointStore", "DirectoryStore", "SqliteStore",
    # services
    "Batcher", "BatcherStats", "BatchExecutor", "PendingResult",
    # errors
    "MicrobatchError", "SourceError", "LineTooLong", "SourceDecodeError", "ExecutorError",
    "WorkerCrashed", "ExecutorUnavailable", "PathNotVisible", "BatchTimeout", "ResultTooLarge",
    "RemoteError",
    "RemoteTraceback",
    "UnpicklableFunction",
    "BackendNotSupported", "BatchFailed", "TooManyDeadLetters",
    "BatchResultMismatch", "CheckpointError", "CheckpointCorrupt",
    "CheckpointMismatch", "CheckpointFinished", "CheckpointWriteError",
    "BatcherError", "BatcherFull", "BatcherClosed",
}  # fmt: skip


def test_public_names_are_exactly_the_documented_ones() -> None:
    assert set(mb.__all__) == DOCUMENTED
    assert len(mb.__all__) == len(set(mb.__all__))


def test_dir_lists_the_public_names_only() -> None:
    assert set(dir(mb)) == DOCUMENTED | {"__version__"}


def test_every_public_name_resolves_and_unknown_names_fail_clearly() -> None:
    for name in mb.__all__:
        assert getattr(mb, name) is not None, name
    try:
        mb.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown attribute resolved")


def test_errors_form_one_hierarchy() -> None:
    for name in mb.__all__:
        obj = getattr(mb, name)
        if isinstance(obj, type) and issubclass(obj, BaseException) and obj is not mb.RemoteTraceback:
            assert issubclass(obj, mb.MicrobatchError), name


def test_the_worker_side_imports_neither_anyio_nor_the_pipeline() -> None:
    code = (
        "import sys, microbatch._core.task, microbatch._core.lines;"
        "print(sorted(m for m in ('anyio', 'aiofiles', 'microbatch.pipeline') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
