"""What to read after a checkpoint: a source resumed at the position of the last batch folded.

A checkpoint records a batch's ``end`` (see :mod:`microbatch.pipeline.reader`); :func:`resume_source`
turns it back into what is left to read, for each way a source is read.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Any

from .._core.params import check_int
from .._exceptions import CheckpointFinished
from ..sources.protocol import Chunk, LineParts, Source, describe_source, ended_idle

__all__ = [
    "aclose_iterator", "chunk_position", "finished_value_stands", "reads_again", "reads_on_after_finish",
    "resume_source", "skip",
]


def resume_source(source: Any, position: Any, file: Any = None) -> Any:
    """What to read after the checkpointed ``position`` (a batch's ``end``) of ``source``.

    - line parts: ``source.resume(position)`` (a byte offset);
    - chunks with positions: ``source.resume(position["chunk"])`` when a chunk was complete, then
      the first ``position["skip"]`` records are skipped: at most the one chunk that was in
      progress is read again;
    - chunks without positions (a TCP server, position None): the source itself;
    - other iterables: read again, skipping ``position`` records (right when the iterable yields
      the same records in the same order each time).

    ``file`` (a ``checkpoints.identity.FileState``, or None): a file source resumes from its saved
    position, whose file it opens by identity (never by a path looked up again); ``rotated`` needs
    ``follow`` (else the state's error); ``recreated`` (followed only) reads the new file from 0.

    A position of the wrong kind for the source raises ``ValueError`` naming it.
    """
    if file is not None and file.position is not None:
        if file.kind == "rotated" and not getattr(source, "follow", False):
            raise file.error()  # only a followed source continues in the new file
        if file.kind == "recreated":
            return source
        return source.resume(file.position)
    if position is None:
        return source
    if isinstance(source, LineParts):
        return source.resume(position)
    if isinstance(source, Source):
        chunk, count = chunk_position(position)
        resumed = source if chunk is None else source.resume(chunk)
        return _Skipped(resumed, count) if count else resumed
    if position == 0:
        return source
    return skip(source, check_int("position", position))


def finished_value_stands(source: Any, position: Any, file: Any, location: str) -> bool:
    """For a finished checkpoint at ``position`` (in ``location``): True when its value stands as
    the run's value, False when the run reads on (:func:`reads_on_after_finish`).

    ``CheckpointFinished`` when ``source`` is a stream that cannot be read again
    (:func:`reads_again`): its old value is not this input's.
    """
    if reads_on_after_finish(source, position, file):
        return False
    if not reads_again(source, position):
        raise CheckpointFinished(location, getattr(source, "where", None) or repr(source))
    return True


def reads_again(source: object, position: Any) -> bool:
    """Whether ``source`` can deliver again what a run that ended at ``position`` read, so that a
    finished run's checkpoint can go on over it (reading what arrived since, or nothing).

    Yes for a file (line parts with file positions, ``position_at``), a chunk source with
    positions (a NATS stream by sequence, many files, your own log: ``resume(position)`` continues
    after it) and any other iterable (read again, as a resumed run reads it). No for the streams:
    line parts without file positions (standard input, a pipe) and a chunk source whose chunks
    carry no positions (a TCP server: its batches end at None).
    """
    if isinstance(source, LineParts):
        return callable(getattr(source, "position_at", None))
    if isinstance(source, Source):
        return position is not None
    return True


def reads_on_after_finish(source: Any, position: Any, file: Any = None) -> bool:
    """Whether a run over a *finished* checkpoint at ``position`` reads on, adding what the source
    gained since, rather than returning the finished value as it stands.

    A file grown since (``file.kind == "grown"``) and a source that resumes from its own positions
    (many files, a stream by sequence) read on: their position tells what is new. An iterable read
    again yields what it yielded before, and a source without positions (a TCP server) cannot
    tell what is new: those do not read on (the iterable keeps its finished value; a stream is
    refused, :func:`reads_again`).
    """
    if file is not None:
        return bool(file.kind == "grown")
    return isinstance(source, Source) and not isinstance(source, LineParts) and position is not None


def chunk_position(position: Any) -> tuple[Any, int]:
    """``(chunk, skip)`` of a chunk source's position; ``ValueError`` naming it if it is not one."""
    if not isinstance(position, dict) or set(position) != {"chunk", "skip"}:
        raise ValueError(
            f"position {position!r} is not a chunk source's position "
            f"({{'chunk': <a chunk's position or None>, 'skip': <records>}}); "
            f"was the checkpoint written for another source?"
        )
    return position["chunk"], check_int("position['skip']", position["skip"])



class _Skipped:
    """A chunk source without its first ``count`` records (the part of a chunk already folded)."""

    def __init__(self, source: Source[Any], count: int) -> None:
        self.source = source
        self.count = count

    @property
    def idle_ended(self) -> bool:
        return ended_idle(self.source)

    def describe(self) -> str:
        return describe_source(self.source)

    def resume(self, position: Any) -> Source[Any]:
        return self.source.resume(position)

    def chunks(self) -> AsyncGenerator[Any, None]:
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[Any, None]:
        left = self.count
        iterator = self.source.chunks()
        try:
            async for chunk in iterator:
                if left:
                    records = chunk.records if isinstance(chunk, Chunk) else chunk
                    dropped = min(left, len(records))
                    left -= dropped
                    records = records[dropped:]
                    if isinstance(chunk, Chunk):
                        chunk = Chunk(records, chunk.position, chunk.undecodable)
                    else:
                        chunk = records
                yield chunk
        finally:
            await aclose_iterator(iterator)

    async def __aenter__(self) -> _Skipped:
        if hasattr(type(self.source), "__aenter__"):
            await self.source.__aenter__()  # type: ignore[attr-defined]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if hasattr(type(self.source), "__aexit__"):
            result: bool | None = await self.source.__aexit__(exc_type, exc, tb)  # type: ignore[attr-defined]
            return result
        return None


async def aclose_iterator(iterator: AsyncIterator[Any]) -> None:
    """Close an async iterator that can be closed (an async generator)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def _skip_async(source: AsyncIterable[Any], n: int) -> AsyncIterator[Any]:
    seen = 0
    async for item in source:
        if seen < n:
            seen += 1
            continue
        yield item


def skip(source: AsyncIterable[Any] | Iterable[Any], n: int) -> AsyncIterable[Any] | Iterable[Any]:
    """The source without its first ``n`` records (resume of an iterable: valid if deterministic)."""
    if isinstance(source, AsyncIterable):
        return _skip_async(source, n)
    if isinstance(source, Iterable):
        return itertools.islice(source, n, None)
    raise TypeError(
        f"cannot resume a {type(source).__name__} source at record {n}: only files (read_lines), "
        f"iterables and async iterables can be resumed"
    )
