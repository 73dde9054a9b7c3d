"""The one line reader behind every line source: a file, a followed file, each TCP connection, stdin.

A :class:`LineReader` is fed the byte reads of one stream and returns each read's complete lines as
a :data:`~microbatch.sources.protocol.Part` ``(head, data, end, start)``, never joined: a pipeline
cuts them into blocks where they lie, and :meth:`LineReader.records` decodes them in place. It
enforces ``max_line_length`` (:class:`LineTooLong` naming ``where`` and the byte offset where the
line starts) and decodes with ``encoding``/``errors`` (:class:`SourceDecodeError` naming ``where``
and the offset of the bad byte), in both cases only after the lines before the fault.

No I/O happens here; :func:`read_parts` and :func:`chunks_of` are the small async loops that the
sources share.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Any

from .._core.lines import LineSplitter, check_encoding, decode_lines, decode_parts
from .._core.params import check_int
from .._exceptions import SourceDecodeError
from .protocol import Part

__all__ = [
    "DEFAULT_MAX_LINE_LENGTH",
    "LineReader",
    "chunks_of",
    "decode_part",
    "read_parts",
]

#: Longest line accepted by default, in bytes without its terminator.
DEFAULT_MAX_LINE_LENGTH = 1 << 20


class LineReader:
    """Turns the byte reads of one stream into parts of complete lines (pure: no I/O).

    ``where`` names the stream in errors (a path, ``<stdin>``, a TCP peer); ``start`` is the byte
    offset of the first byte fed. ``position`` is the offset just after the lines returned so far.
    """

    __slots__ = ("encoding", "errors", "where", "_splitter")

    def __init__(
        self,
        where: str,
        *,
        start: int = 0,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        encoding: str | None = "utf-8",
        errors: str = "strict",
    ) -> None:
        check_int("max_line_length", max_line_length, minimum=1)
        check_encoding(encoding, errors)
        self.where = where
        self.encoding = encoding
        self.errors = errors
        self._splitter = LineSplitter(where, start, max_line_length)

    @property
    def position(self) -> int:
        """Byte offset just after the last line returned."""
        return self._splitter.position

    @property
    def pending(self) -> int:
        """Bytes of a partial last line held back."""
        return self._splitter.pending

    def feed(self, data: bytes) -> Part | None:
        """The complete lines ``data`` finished, as one part, or ``None`` when it finished none.

        A line longer than ``max_line_length`` raises :class:`LineTooLong`, after the lines before
        it were returned: on the next call, or on :meth:`raise_pending`.
        """
        parts = self._splitter.feed_parts(data)
        if parts is None:
            return None
        head, end = parts
        return head, data, end, self._splitter.position - len(head) - end

    def raise_pending(self) -> None:
        """Raise the :class:`LineTooLong` found by the last :meth:`feed`, if any."""
        self._splitter.raise_pending()

    def finish(self) -> Part | None:
        """The stream ended: its partial last line as a part of its own, or ``None``."""
        lines = self._splitter.finish()
        if lines is None:
            return None
        return b"", lines, len(lines), self._splitter.position - len(lines)

    def reset(self, position: int) -> None:
        """Start over at ``position`` (a followed file truncated or replaced), nothing held back."""
        self._splitter.reset(position)

    def records(self, part: Part) -> tuple[list[Any], SourceDecodeError | None]:
        """The records of ``part`` and the decoding error to raise after delivering them, if any."""
        return decode_part(part, self.encoding, self.errors, self.where)


def decode_part(
    part: Part, encoding: str | None, errors: str, where: str
) -> tuple[list[Any], SourceDecodeError | None]:
    """The records of the lines of ``part`` (without terminators), decoded in place when possible.

    Undecodable bytes (with ``errors="strict"``) do not lose the good lines: the records of the
    lines before the bad one come back with the :class:`SourceDecodeError`, which names ``where``
    and the byte offset, for the caller to raise once it has delivered them.
    """
    head, data, end, start = part
    try:
        return decode_parts(head, data, end, encoding=encoding, errors=errors, where=where, start=start), None
    except SourceDecodeError as exc:
        lines = b"".join((head, memoryview(data)[:end])) if head else data[:end]
        cut = lines.rfind(b"\n", 0, exc.offset - start) + 1
        good = decode_lines(lines[:cut], encoding=encoding, errors=errors, where=where, start=start)
        return good, exc


async def read_parts(reads: AsyncIterable[bytes], reader: LineReader) -> AsyncGenerator[Part, None]:
    """The parts of a stream read in pieces (``reads`` ends with the stream; empty reads are skipped).

    A partial last line becomes a part of its own when the stream ends.
    """
    async for data in reads:
        if not data:
            continue
        part = reader.feed(data)
        if part is not None:
            yield part
        reader.raise_pending()
    part = reader.finish()
    if part is not None:
        yield part


async def chunks_of(
    parts: AsyncIterator[Part], encoding: str | None, errors: str, where: str
) -> AsyncGenerator[list[Any], None]:
    """The records of ``parts``, one non-empty list per part.

    On undecodable bytes the records before the bad line come first, then
    :class:`SourceDecodeError` is raised. ``parts`` is closed when this generator is.
    """
    try:
        async for part in parts:
            records, error = decode_part(part, encoding, errors, where)
            if records:
                yield records
            if error is not None:
                raise error from error.__cause__
    finally:
        aclose = getattr(parts, "aclose", None)
        if aclose is not None:
            await aclose()
