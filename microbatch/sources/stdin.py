"""The lines of standard input (or of any readable file descriptor): :func:`stdin_lines`.

Read by the shared line reader, so the options, limits and errors are those of
:func:`~microbatch.read_lines`: ``max_line_length``, ``encoding``, ``errors``, and
:class:`LineTooLong`/:class:`SourceDecodeError` naming ``<stdin>`` and the byte offset. It is a
line-parts source: a pipeline ships its raw bytes to workers, as for a file.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, Generic, TypeVar, overload

import anyio

from .._core.lines import check_encoding
from .._core.params import check_int
from .._exceptions import SourceError
from .linereader import DEFAULT_MAX_LINE_LENGTH, LineReader, chunks_of
from .protocol import Part

__all__ = ["DEFAULT_STDIN_READ_SIZE", "StdinLines", "stdin_fd", "stdin_lines"]

T = TypeVar("T", str, bytes)

#: Bytes asked of standard input per read.
DEFAULT_STDIN_READ_SIZE = 1 << 16

#: The fingerprint text of standard input: it names what is read, and stdin has no path.
STDIN_DESCRIPTION = "stdin"


class StdinLines(Generic[T]):
    """The lines of a readable file descriptor, standard input by default.

    Made by :func:`stdin_lines`, which documents the parameters. Pipes, sockets and terminals are
    awaited with ``anyio.wait_readable`` (the event loop never blocks); a regular file (``< file``),
    ``/dev/null`` and other devices are read in a worker thread. Standard input cannot be read
    twice: iterate it once.
    """

    where = "<stdin>"

    def __init__(
        self,
        fd: int | None,
        *,
        encoding: str | None,
        errors: str,
        max_line_length: int,
        read_size: int,
        start: int = 0,
    ) -> None:
        check_encoding(encoding, errors)
        check_int("max_line_length", max_line_length, minimum=1)
        check_int("read_size", read_size, minimum=1)
        check_int("start", start)
        if fd is not None:
            check_int("fd", fd)
        self.fd = fd
        self.encoding = encoding
        self.errors = errors
        self.max_line_length = max_line_length
        self.read_size = read_size
        self.start = start

    def __repr__(self) -> str:
        return f"stdin_lines(encoding={self.encoding!r}, errors={self.errors!r}, start={self.start})"

    def describe(self) -> str:
        """``"stdin"``: standard input has no name that would tell two inputs apart."""
        return STDIN_DESCRIPTION

    def resume(self, position: Any) -> StdinLines[T]:
        """Standard input read again from its start, skipping the first ``position`` bytes.

        Standard input cannot seek: a resumed run reads the input it is given (the same input,
        piped again) and discards the bytes a checkpoint counted. ``position`` must be the start of
        a line of that input, else reading raises ``ValueError``. None or 0: this source itself.
        """
        if position is None or position == 0:
            return self
        offset = check_int("position", position)
        return StdinLines(
            self.fd,
            encoding=self.encoding,
            errors=self.errors,
            max_line_length=self.max_line_length,
            read_size=self.read_size,
            start=offset,
        )

    def parts(self) -> AsyncGenerator[Part, None]:
        """The lines as read, not joined: ``(head, data, end, start)`` tuples with byte offsets."""
        return self._parts()

    def chunks(self) -> AsyncGenerator[list[T], None]:
        """The records, one non-empty list per read; on undecodable bytes (``errors="strict"``)
        the records before the bad line come first, then :class:`SourceDecodeError`."""
        return chunks_of(self._parts(), self.encoding, self.errors, self.where)

    def __aiter__(self) -> AsyncGenerator[T, None]:
        return self._lines()

    async def _lines(self) -> AsyncGenerator[T, None]:
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                for line in chunk:
                    yield line

    async def _parts(self) -> AsyncGenerator[Part, None]:
        fd = stdin_fd() if self.fd is None else self.fd
        size, start = self.read_size, self.start
        pollable = _pollable(fd, self.where)

        async def read() -> bytes:
            if not pollable:
                return await anyio.to_thread.run_sync(os.read, fd, size)
            await anyio.wait_readable(fd)
            return os.read(fd, size)

        data = await self._skip(read, start)
        reader = LineReader(
            self.where,
            start=start,
            max_line_length=self.max_line_length,
            encoding=self.encoding,
            errors=self.errors,
        )
        while True:
            part = reader.feed(data) if data else reader.finish()
            if part is not None:
                yield part
            if not data:
                return
            reader.raise_pending()
            data = await read()

    async def _skip(self, read: Any, start: int) -> bytes:
        """Discard the first ``start`` bytes; return the first read's bytes after them."""
        seen = 0
        last = b"\n"
        while True:
            data: bytes = await read()
            if seen + len(data) >= start or not data:
                break
            seen += len(data)
            last = data[-1:]
        if seen + len(data) < start:
            raise ValueError(
                f"{self.where}: start={start} is past the end of the input ({seen} bytes); "
                f"a resumed run needs the same input piped again"
            )
        cut = start - seen
        if cut:
            last = data[cut - 1 : cut]
        if last != b"\n":
            raise ValueError(
                f"{self.where}: start={start} is not the beginning of a line (byte {start - 1} is "
                f"not a newline); a resumed run needs the same input piped again"
            )
        rest = data[cut:]
        if data and not rest:
            rest = await read()  # the skipped bytes ended with this read; b"" only at the end
        return rest


def stdin_fd() -> int:
    """The descriptor of standard input; ``SourceError`` when the process was started without one.

    A process started with its standard input closed (``<&-``) has no ``sys.stdin``, and the
    descriptor 0 it would have read may since name a file the process opened for itself.
    """
    stdin = sys.stdin
    fd = None
    if stdin is not None:
        try:
            fd = stdin.fileno()
            os.fstat(fd)
        except (OSError, ValueError):  # closed since, or not a real descriptor (replaced sys.stdin)
            fd = None
    if fd is None:
        raise SourceError(
            "<stdin>: standard input is closed (started with '<&-' or without one); give the input "
            "on it ('< file' or a pipe) or read a file instead"
        )
    return fd


def _pollable(fd: int, where: str) -> bool:
    """Whether ``fd`` can be awaited with ``wait_readable``: a pipe, a socket or a terminal.

    Anything else (a regular file, ``/dev/null`` and other devices) is read in a worker thread:
    the event loop's poller refuses them (``epoll`` says EPERM) and they never block for long.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise SourceError(f"{where}: cannot read descriptor {fd} ({exc.strerror})") from exc
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


@overload
def stdin_lines(
    *,
    fd: int | None = ...,
    encoding: str = ...,
    errors: str = ...,
    max_line_length: int = ...,
    read_size: int = ...,
) -> StdinLines[str]: ...


@overload
def stdin_lines(
    *,
    fd: int | None = ...,
    encoding: None,
    errors: str = ...,
    max_line_length: int = ...,
    read_size: int = ...,
) -> StdinLines[bytes]: ...


def stdin_lines(
    *,
    fd: int | None = None,
    encoding: str | None = "utf-8",
    errors: str = "strict",
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    read_size: int = DEFAULT_STDIN_READ_SIZE,
) -> StdinLines[Any]:
    """The lines of standard input, without their ``\\n``/``\\r\\n``, as an async iterable.

    - ``fd`` (default None: ``sys.stdin``'s descriptor, looked up when reading starts): another
      readable descriptor (a pipe's read end); it is not closed.
    - ``encoding`` (default ``"utf-8"``, ASCII-compatible codecs only; ``None`` yields ``bytes``).
    - ``errors`` (default ``"strict"``): undecodable bytes raise :class:`SourceDecodeError` naming
      ``<stdin>`` and the byte offset, after the records of the lines before the bad one;
      ``"replace"`` and the other handlers of ``bytes.decode`` keep every line.
    - ``max_line_length`` (default 1 MiB): a longer line raises :class:`LineTooLong` naming
      ``<stdin>`` and the offset where the line starts, after the records before it.
    - ``read_size`` (default 64 KiB): bytes per read; memory is about one read plus one line.

    A last line without a newline is a record. The iteration ends when the input ends.
    """
    return StdinLines(
        fd,
        encoding=encoding,
        errors=errors,
        max_line_length=max_line_length,
        read_size=read_size,
    )
