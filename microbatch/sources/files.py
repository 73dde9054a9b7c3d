"""The lines of a file, also of a growing one (like ``tail -F``): :func:`read_lines`.

A file is read in large blocks split at C speed by the shared line reader
(:mod:`microbatch.sources.linereader`): the source never awaits once per line. It offers three
views of the same records, from the most convenient to the fastest:

- ``async for line in source`` — one record at a time (``str``, or ``bytes`` with ``encoding=None``);
- ``source.chunks()`` — one ``list`` of records per block read (about ``block_size`` bytes);
- ``source.parts()`` — the raw bytes of each read with their exact byte positions
  (:data:`~microbatch.sources.protocol.Part`), which a pipeline cuts into blocks of lines for
  worker processes and resumes from.

Lines end with ``\\n`` or ``\\r\\n``; the terminator is not part of the record. Encodings must be
ASCII-compatible (UTF-8, Latin-1, cp1252, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import IO, Any, Generic, TypeVar, overload

import anyio

from .._core.lines import check_encoding
from .._core.params import check_int, check_seconds
from .linereader import DEFAULT_MAX_LINE_LENGTH, LineReader, chunks_of
from .protocol import Part

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_POLL_INTERVAL", "LineSource", "read_lines"]

logger = logging.getLogger("microbatch.sources")

T = TypeVar("T", str, bytes)

#: Bytes read from a file per thread hop (one block).
DEFAULT_BLOCK_SIZE = 1 << 20
#: Seconds between two checks of a followed file that had nothing new.
DEFAULT_POLL_INTERVAL = 0.2


# -- files -------------------------------------------------------------------------------------------


class LineSource(Generic[T]):
    """The lines of a file, read in large blocks; optionally followed as it grows (``follow=True``).

    Made by :func:`read_lines`, which documents the parameters. A ``LineSource`` is a description,
    not an open file: every iteration (``async for``, ``chunks()``, ``parts()``) opens the file
    anew at ``start``, so the same source can be read several times. Breaking out of an iteration
    closes the file once the iterator is closed (at once with ``contextlib.aclosing``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encoding: str | None,
        errors: str,
        follow: bool,
        start: int,
        block_size: int,
        max_line_length: int,
        poll_interval: float,
    ) -> None:
        check_encoding(encoding, errors)
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start must be an int byte offset, got {start!r}")
        if start < 0:
            raise ValueError(f"start must be a byte offset >= 0, got {start}")
        check_int("block_size", block_size, minimum=1)
        check_int("max_line_length", max_line_length, minimum=1)
        check_seconds("poll_interval", poll_interval)
        self.path: str = os.fspath(path)
        #: Names the source in messages (its path).
        self.where: str = self.path
        self.encoding = encoding
        self.errors = errors
        self.follow = follow
        self.start = start
        self.block_size = block_size
        self.max_line_length = max_line_length
        self.poll_interval = poll_interval

    def __repr__(self) -> str:
        return (
            f"read_lines({self.path!r}, encoding={self.encoding!r}, errors={self.errors!r}, "
            f"follow={self.follow}, start={self.start})"
        )

    def describe(self) -> str:
        """``file:`` and the absolute path: names what is read, for the pipeline's fingerprint."""
        return f"file:{os.path.abspath(self.path)}"

    def resume(self, position: Any) -> LineSource[T]:
        """The source continued at byte offset ``position`` (a batch's end); None or 0: itself."""
        if position is None or position == 0:
            return self
        return self.with_start(check_int("position", position))

    def with_start(self, offset: int) -> LineSource[T]:
        """A copy of this source that starts at byte ``offset`` (the ``end`` of a block read before).

        The offset must be the start of a line: reading raises ``ValueError`` otherwise.
        """
        return LineSource(
            self.path,
            encoding=self.encoding,
            errors=self.errors,
            follow=self.follow,
            start=offset,
            block_size=self.block_size,
            max_line_length=self.max_line_length,
            poll_interval=self.poll_interval,
        )

    def splittable(self) -> bool:
        """True when workers may read byte ranges of the file themselves (pipeline splits).

        That is a regular file read without ``follow`` (not a FIFO, a device or a growing log);
        ``False`` also when the path does not exist yet. Does a ``stat``: call it off the event loop.
        """
        try:
            return not self.follow and os.path.isfile(self.path)
        except OSError:  # pragma: no cover - isfile() already answers False for most errors
            return False

    def __aiter__(self) -> AsyncGenerator[T, None]:
        return self._lines()

    async def _lines(self) -> AsyncGenerator[T, None]:
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                for line in chunk:
                    yield line

    def chunks(self) -> AsyncGenerator[list[T], None]:
        """The records, one non-empty list per block read (about ``block_size`` bytes of lines).

        On undecodable bytes, the records before the bad line come first, then
        :class:`SourceDecodeError` is raised.
        """
        return chunks_of(self._raw(), self.encoding, self.errors, self.path)

    def parts(self) -> AsyncGenerator[Part, None]:
        """The lines as read, not joined: ``(head, data, end, start)`` tuples.

        The lines of each are ``head + data[:end]`` (``head``: the partial line carried over from
        the read before, often empty; ``data``: the bytes of one read), starting at byte
        ``start``; every tuple holds at least one line. For readers that cut or split the bytes
        where they lie (the pipeline's reader) instead of joining them first, as
        :meth:`chunks` does. Positions restart at 0 after a truncation or a rotation of a followed
        file.
        """
        return self._raw()

    def _open(self) -> tuple[IO[bytes], int]:
        """Open the file at ``start`` (in a worker thread); returns the file and its start offset."""
        f = open(self.path, "rb", buffering=0)  # closed by _raw
        try:
            start = self.start
            size = os.fstat(f.fileno()).st_size
            if start > size:
                if not self.follow:
                    raise ValueError(
                        f"{self.path}: start={start} is past the end of the file ({size} bytes); "
                        f"was the file replaced since that offset was recorded?"
                    )
                start = 0  # truncated since the offset was recorded: read it all, like tail -F
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    raise ValueError(
                        f"{self.path}: start={start} is not the beginning of a line (byte {start - 1} "
                        f"is not a newline); pass the end offset of a block or record read before"
                    )
            return f, start
        except BaseException:
            f.close()
            raise

    def _poll(self, f: IO[bytes]) -> str:
        """After EOF: ``"data"``, ``"truncated"``, ``"rotated"`` or ``"idle"`` (in a worker thread)."""
        position = f.tell()
        current = os.fstat(f.fileno())
        if current.st_size < position:
            return "truncated"
        if current.st_size > position:
            return "data"  # appended between our read and this check
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return "idle"  # moved away and not yet replaced: keep reading the old file
        if (at_path.st_ino, at_path.st_dev) != (current.st_ino, current.st_dev):
            return "rotated"
        return "idle"

    def _open_new(self) -> IO[bytes] | None:
        """Open the new file at ``path`` after a rotation, or ``None`` if the path is gone again."""
        try:
            return open(self.path, "rb", buffering=0)  # closed by _raw
        except FileNotFoundError:
            return None

    async def _raw(self) -> AsyncGenerator[Part, None]:
        """The reading and following behind every view: ``(head, data, end, start)`` tuples.

        The lines of each are ``head + data[:end]`` (``head``: the partial line carried from the
        block before, often empty; ``data``: the block as read), starting at byte ``start``. The
        parts are not joined here: decoding splits ``data`` where it lies.
        """
        f, start = await anyio.to_thread.run_sync(self._open)
        new: IO[bytes] | None = None
        reader = LineReader(
            self.path,
            start=start,
            max_line_length=self.max_line_length,
            encoding=self.encoding,
            errors=self.errors,
        )
        read, block_size = f.read, self.block_size
        try:
            while True:
                data = await anyio.to_thread.run_sync(read, block_size)
                if data:
                    part = reader.feed(data)
                    if part is not None:
                        yield part
                    reader.raise_pending()
                    continue
                if self.follow:
                    if new is not None:
                        # The old file, read to its end after the rotation: go on with the new one.
                        f.close()
                        f, new = new, None
                        read = f.read
                    else:
                        state = await anyio.to_thread.run_sync(self._poll, f)
                        if state == "data":
                            continue
                        if state == "idle":
                            await anyio.sleep(self.poll_interval)
                            continue
                        if state == "rotated":
                            new = await anyio.to_thread.run_sync(self._open_new)
                            if new is None:
                                await anyio.sleep(self.poll_interval)
                            # Read what reached the old file before the switch, then switch.
                            continue
                # The file this partial line belongs to has ended: it will not be completed.
                part = reader.finish()
                if part is not None:
                    yield part
                if not self.follow:
                    return
                if f.tell() > 0:
                    logger.info("%s: truncated, reading again from byte 0", self.path)
                    await anyio.to_thread.run_sync(f.seek, 0)
                else:
                    logger.info("%s: rotated (a new file at the path), reading it from byte 0", self.path)
                reader.reset(0)
        finally:
            f.close()
            if new is not None:
                new.close()


@overload
def read_lines(
    path: str | os.PathLike[str],
    *,
    encoding: str = ...,
    errors: str = ...,
    follow: bool = ...,
    start: int = ...,
    block_size: int = ...,
    max_line_length: int = ...,
    poll_interval: float = ...,
) -> LineSource[str]: ...


@overload
def read_lines(
    path: str | os.PathLike[str],
    *,
    encoding: None,
    errors: str = ...,
    follow: bool = ...,
    start: int = ...,
    block_size: int = ...,
    max_line_length: int = ...,
    poll_interval: float = ...,
) -> LineSource[bytes]: ...


def read_lines(
    path: str | os.PathLike[str],
    *,
    encoding: str | None = "utf-8",
    errors: str = "strict",
    follow: bool = False,
    start: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> LineSource[Any]:
    """The lines of the file at ``path``, without their ``\\n``/``\\r\\n``, as an async iterable.

    - ``encoding`` (default ``"utf-8"``, ASCII-compatible codecs only): ``None`` yields ``bytes``.
    - ``errors`` (default ``"strict"``): undecodable bytes raise :class:`SourceDecodeError` naming
      the path and byte offset, after the records before that line; ``"replace"``, ``"ignore"``,
      ``"backslashreplace"``, ... are passed to ``bytes.decode``.
    - ``start`` (default 0): byte offset of the first line to read; must be the beginning of a
      line (the ``end`` of a block read before), else ``ValueError``. Past the end of the file:
      ``ValueError`` (with ``follow=True``: the file was truncated, read from 0).
    - ``block_size`` (default 1 MiB): bytes read per thread hop; memory is about one block plus
      one line.
    - ``max_line_length`` (default 1 MiB): a longer line (bytes, without ``\\n``) raises
      :class:`LineTooLong` naming the path and the offset where the line starts, after the records
      before it.
    - ``follow`` (default False): tail the file like ``tail -F``; see below.
    - ``poll_interval`` (default 0.2 s): how often a followed file is checked when idle.

    A last line without a newline is a record. A missing file raises ``FileNotFoundError`` with
    the path when the iteration starts (also with ``follow=True``).

    With ``follow=True`` the iteration never ends by itself. New lines are delivered as they are
    appended; a partial last line is held back until its newline arrives. The file is checked every
    ``poll_interval`` when there is nothing new: if it shrank (truncation), reading restarts at
    byte 0; if the path names another file (rotation), the old file is read to its end, then the new
    one from byte 0. In both cases a held-back partial line is delivered as a record, since the file
    it belongs to has ended. While the path is missing (moved away, not yet re-created), the old file
    keeps being read. A truncation followed by a rewrite past the read position within one poll
    interval cannot be seen (as with ``tail -F``).
    """
    return LineSource(
        path,
        encoding=encoding,
        errors=errors,
        follow=follow,
        start=start,
        block_size=block_size,
        max_line_length=max_line_length,
        poll_interval=poll_interval,
    )
