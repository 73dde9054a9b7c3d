"""The source protocol: what the pipeline asks of a source, and nothing more.

A pipeline reads a source in one of three ways, chosen by what the source can do (never by its
class):

1. **Raw line parts** (:class:`LineParts`): files and standard input hand over the bytes of their
   reads; the pipeline cuts them into blocks of whole lines and workers decode them. Positions are
   byte offsets; ``resume(offset)`` continues at the line that starts there.
2. **Chunks with positions** (:class:`Source`): ``chunks()`` yields :class:`Chunk` objects, each
   with a JSON ``position`` meaning "everything up to and including this chunk". The pipeline
   checkpoints the position of the last chunk whose records are all folded plus how many records of
   the next chunk are folded; on resume it calls ``resume(position)`` and skips only those records.
   A ``chunks()`` that yields plain lists has no positions (a TCP server): its records cannot be
   read again, so a resumed run continues with what arrives next.
3. **Any iterable or async iterable** of records: positions count records, and a resumed run reads
   the iterable again and skips what was folded (correct when the iterable yields the same records
   in the same order each time).

Every source may also have ``describe()``: a stable text for the checkpoint's fingerprint (without
one, the fingerprint names the source's class), and ``idle_ended``: true when its latest reading
ended because no record came for its ``stop_when_idle`` seconds (:func:`ended_idle`), not because
its input ended.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from .._exceptions import SourceError

__all__ = ["Chunk", "LineParts", "Part", "Source", "describe_source", "ended_idle", "records_of"]

T_co = TypeVar("T_co", covariant=True)
JSON = Any

#: One read of a line source: ``(head, data, end, start)``. ``head`` is the partial line carried
#: from earlier reads (often empty), ``data[:end]`` holds this read's whole lines (``end`` may be
#: ``len(data)`` when the source ended without a final newline), and ``start`` is the byte offset of
#: ``head``'s first byte (of ``data``'s when ``head`` is empty).
Part = tuple[bytes, bytes, int, int]


class Chunk(Generic[T_co]):
    """Records read together, and the source position just after the last of them.

    ``position`` is JSON data (numbers, strings, lists, dicts, None) that the same source's
    ``resume(position)`` understands.

    ``undecodable`` holds ``(position, raw bytes, message)`` for each record read with the chunk
    that did not decode (left out of ``records``; ``position`` names the record in its source, a
    stream sequence). A pipeline writes them to its dead letters with the batch that completes the
    chunk, as it does for lines that do not decode; reading the records one by one
    (:func:`records_of`) raises :class:`~microbatch.SourceError` naming the first, after the
    chunk's other records.
    """

    __slots__ = ("position", "records", "undecodable")

    def __init__(
        self,
        records: Sequence[T_co],
        position: JSON,
        undecodable: Sequence[tuple[int, bytes, str]] = (),
    ) -> None:
        self.records = records
        self.position = position
        self.undecodable = undecodable

    def __repr__(self) -> str:
        return f"Chunk({len(self.records)} records, position={self.position!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chunk):
            return NotImplemented
        return list(self.records) == list(other.records) and self.position == other.position

    __hash__ = None  # type: ignore[assignment]  # records are mutable sequences


@runtime_checkable
class Source(Protocol[T_co]):
    """A source that resumes from its own positions (an offset in a log, a page token, ...).

    It may also have ``describe()``, a stable text that names what is read (not when), for the
    pipeline's fingerprint; without one, the fingerprint names the source's class.
    """

    def chunks(self) -> AsyncIterator[Chunk[T_co]]:
        """The records, in chunks, each with the position after it."""
        ...

    def resume(self, position: JSON) -> Source[T_co]:
        """A source that continues just after ``position`` (a position one of its chunks had)."""
        ...


@runtime_checkable
class LineParts(Protocol):
    """A source of lines handed over as raw bytes (files, standard input).

    ``where`` names it in messages (a path, ``<stdin>``); ``encoding`` (None: bytes records) and
    ``errors`` say how workers decode its lines.
    """

    where: str
    encoding: str | None
    errors: str

    def describe(self) -> str: ...

    def parts(self) -> AsyncIterator[Part]: ...

    def resume(self, position: JSON) -> LineParts: ...


def describe_source(source: object) -> str:
    """The source's text for the pipeline's fingerprint: ``describe()``, else its type's name."""
    describe = getattr(source, "describe", None)
    if callable(describe):
        text = describe()
        if not isinstance(text, str):
            raise TypeError(f"{type(source).__qualname__}.describe() must return a str, got {text!r}")
        return text
    return f"{'source' if isinstance(source, Source) else 'iterable'}:{type(source).__qualname__}"


def ended_idle(source: object) -> bool:
    """Whether the source's latest reading ended because it was quiet for its ``stop_when_idle``
    seconds: its input goes on, so a run that read it to that end has not finished it."""
    return bool(getattr(source, "idle_ended", False))


async def records_of(source: Source[T_co]) -> AsyncGenerator[T_co, None]:
    """A chunk source's records one by one (its ``chunks()`` is faster: one list per chunk)."""
    async with aclosing(source.chunks()) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            for record in chunk.records:
                yield record
            if chunk.undecodable:
                raise SourceError(chunk.undecodable[0][2])
