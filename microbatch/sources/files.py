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

import errno
import logging
import os
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import IO, Any, Generic, TypeVar, overload

import anyio

from .._core.lines import check_encoding
from .._core.params import check_int, check_seconds
from ..checkpoints.identity import FileIdentity, file_identity
from .follow import FileTrail, follow_parts
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
        wait_for_file: float | None = None,
        rotated: str | None = None,
    ) -> None:
        check_encoding(encoding, errors)
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start must be an int byte offset, got {start!r}")
        if start < 0:
            raise ValueError(f"start must be a byte offset >= 0, got {start}")
        check_int("block_size", block_size, minimum=1)
        check_int("max_line_length", max_line_length, minimum=1)
        check_seconds("poll_interval", poll_interval)
        if wait_for_file is not None:
            check_seconds("wait_for_file", wait_for_file)
            if not follow:
                raise ValueError("wait_for_file waits for a file to follow: it needs follow=True")
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
        self.wait_for_file = wait_for_file
        #: The rotated file to finish from ``start`` before the file at ``path`` (see
        #: :meth:`continue_rotated`); None: read ``path`` from ``start``.
        self.rotated = rotated
        #: The files the latest reading of a followed source went through (for checkpoints).
        self.trail: FileTrail | None = None

    def __repr__(self) -> str:
        return (
            f"read_lines({self.path!r}, encoding={self.encoding!r}, errors={self.errors!r}, "
            f"follow={self.follow}, start={self.start})"
            + ("" if self.rotated is None else f".continue_rotated({self.rotated!r}, {self.start})")
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
        return self._copy(offset, None)

    def continue_rotated(self, rotated: str | os.PathLike[str], offset: int) -> LineSource[T]:
        """A followed source that finishes the rotated file ``rotated`` from byte ``offset`` (the end of
        a block read before it was rotated), then reads the file at ``path`` (and any file rotated
        in between) from its start, and follows it.

        For a run resumed after its file was rotated (``FileState`` kind ``"rotated"``). Without
        ``follow`` a rotation is not followed: ``ValueError``. Offsets after the switch are offsets
        in the new file.
        """
        if not self.follow:
            raise ValueError(
                f"{self.path} was rotated to {os.fspath(rotated)}: only a followed source "
                f"(follow=True) continues in the new file"
            )
        return self._copy(check_int("offset", offset, minimum=0), os.fspath(rotated))

    def _copy(self, start: int, rotated: str | None) -> LineSource[T]:
        return LineSource(
            self.path,
            encoding=self.encoding,
            errors=self.errors,
            follow=self.follow,
            start=start,
            block_size=self.block_size,
            max_line_length=self.max_line_length,
            poll_interval=self.poll_interval,
            wait_for_file=self.wait_for_file,
            rotated=rotated,
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

    def identity(self, offset: int, records: int) -> FileIdentity | None:
        """The identity of the file that the ``records``-th record of the latest reading ended in,
        read up to ``offset``: for a checkpoint of a followed file, which may have been rotated
        while the batches before the rotation were still being folded. ``records`` counts from the
        start of that reading. Before any reading (or without ``follow``): the file at ``path``.
        Blocks; call it in a worker thread.
        """
        trail = self.trail
        if trail is None:
            return file_identity(self.path, offset)
        return trail.identity(offset, records)

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
        f = open(self.rotated or self.path, "rb", buffering=0)  # closed by _raw or the trail
        name = self.rotated or self.path
        try:
            start = self.start
            size = os.fstat(f.fileno()).st_size
            if start > size:
                if not self.follow or self.rotated is not None:
                    raise ValueError(
                        f"{name}: start={start} is past the end of the file ({size} bytes); "
                        f"was the file replaced since that offset was recorded?"
                    )
                start = 0  # truncated since the offset was recorded: read it all, like tail -F
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":
                    raise ValueError(
                        f"{name}: start={start} is not the beginning of a line (byte {start - 1} "
                        f"is not a newline); pass the end offset of a block or record read before"
                    )
            return f, start
        except BaseException:
            f.close()
            raise

    async def _wait_and_open(self) -> tuple[IO[bytes], int]:
        """Open the file; a followed file that does not exist yet is waited for (``wait_for_file``)."""
        if not self.follow or self.rotated is not None:
            return await anyio.to_thread.run_sync(self._open)
        waited = anyio.current_time()
        logged = False
        while True:
            try:
                return await anyio.to_thread.run_sync(self._open)
            except FileNotFoundError:  # noqa: PERF203 - once per poll of a missing file
                if not logged:
                    logger.info("waiting for %s to exist", self.path)
                    logged = True
                limit = self.wait_for_file
                if limit is not None and anyio.current_time() - waited >= limit:
                    raise FileNotFoundError(
                        errno.ENOENT,
                        f"{self.path} did not appear within wait_for_file={limit:g} s "
                        f"(no such file or directory)",
                        self.path,
                    ) from None
                await anyio.sleep(self.poll_interval)

    def _raw(self) -> AsyncGenerator[Part, None]:
        """The reading behind every view: ``(head, data, end, start)`` tuples.

        The lines of each are ``head + data[:end]`` (``head``: the partial line carried from the
        block before, often empty; ``data``: the block as read), starting at byte ``start``. The
        parts are not joined here: decoding splits ``data`` where it lies.
        """
        return self._follow() if self.follow else self._read()

    async def _follow(self) -> AsyncGenerator[Part, None]:
        f, start = await self._wait_and_open()
        async with aclosing(follow_parts(self, f, start)) as parts:  # the trail closes f
            async for part in parts:
                yield part

    async def _read(self) -> AsyncGenerator[Part, None]:
        f, start = await anyio.to_thread.run_sync(self._open)
        try:
            reader = LineReader(
                self.path,
                start=start,
                max_line_length=self.max_line_length,
                encoding=self.encoding,
                errors=self.errors,
            )
            read, block_size = f.read, self.block_size
            while data := await anyio.to_thread.run_sync(read, block_size):
                part = reader.feed(data)
                if part is not None:
                    yield part
                reader.raise_pending()
            part = reader.finish()
            if part is not None:
                yield part
        finally:
            f.close()


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
    wait_for_file: float | None = ...,
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
    wait_for_file: float | None = ...,
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
    wait_for_file: float | None = None,
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
    - ``poll_interval`` (default 0.2 s): the longest a followed file waits between two checks
      when idle (changes wake it at once where the OS notifies them); also how often a missing
      file is looked for.
    - ``wait_for_file`` (default None, with ``follow=True`` only): a followed file that does not
      exist yet is waited for, at most this many seconds (None: as long as the reading lasts);
      then ``FileNotFoundError`` naming the path and the wait.

    A last line without a newline is a record. Without ``follow`` a missing file raises
    ``FileNotFoundError`` with the path when the iteration starts.

    With ``follow=True`` the iteration never ends by itself (see :mod:`microbatch.sources.follow`).
    New lines are delivered as they are appended; a partial last line is held back until its
    newline arrives. At the end of the data the reader waits for a change of the folder (inotify,
    kqueue through ``watchfiles``; polling every ``poll_interval`` where unavailable). If the file
    shrank below the read position (truncation, ``copytruncate``), a WARNING names the file and the
    bytes skipped, and reading restarts at byte 0. If the path names another file (rotation), the
    old file, kept open, is read to its end, then the file written after it: with rotations faster
    than the reader, the rotated files in between (``app.log.2``, ``app.log.1``) are read in turn,
    not skipped. In both cases a held-back partial line is delivered as a record, since the file
    it belongs to has ended. A truncation followed by a rewrite past the read position before the
    reader looks cannot be seen (as with ``tail -F``).
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
        wait_for_file=wait_for_file,
    )
