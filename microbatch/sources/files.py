"""Line sources: a file (also a growing one, like ``tail -F``) and a TCP server.

Both read large blocks and split them at C speed: a source never awaits once per line. Each offers
three views of the same records, from the most convenient to the fastest:

- ``async for line in source`` — one record at a time (``str``, or ``bytes`` with ``encoding=None``);
- ``source.chunks()`` — one ``list`` of records per read (a 1 MiB block of a file, one socket read);
- ``LineSource.blocks()`` — raw :class:`~microbatch._lines.LineBlock` s of undecoded lines with their
  exact byte positions, which a pipeline ships to worker processes and resumes from.

Lines end with ``\\n`` or ``\\r\\n``; the terminator is not part of the record. Encodings must be
ASCII-compatible (UTF-8, Latin-1, cp1252, ...).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncGenerator
from contextlib import aclosing
from types import TracebackType
from typing import IO, Any, Generic, TypeVar, overload

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._core.lines import LineBlock, LineSplitter, check_encoding, decode_lines, decode_parts
from .._exceptions import LineTooLong, SourceDecodeError

__all__ = ["LineSource", "TcpLines", "read_lines", "tcp_lines"]

logger = logging.getLogger("microbatch.sources")

T = TypeVar("T", str, bytes)

#: Bytes read from a file per thread hop (one block).
DEFAULT_BLOCK_SIZE = 1 << 20
#: Longest line accepted by default, in bytes without its terminator.
DEFAULT_MAX_LINE_LENGTH = 1 << 20
#: Seconds between two checks of a followed file that had nothing new.
DEFAULT_POLL_INTERVAL = 0.2
#: Most TCP clients served at once by default.
DEFAULT_MAX_CONNECTIONS = 100
#: Bytes asked of a socket per read.
DEFAULT_READ_SIZE = 1 << 16
#: Chunks (one per socket read) a TCP server holds for a consumer that does not read.
DEFAULT_BUFFER_SIZE = 16


def _check_positive(name: str, value: object, *, allow_float: bool = False) -> None:
    kinds: tuple[type, ...] = (int, float) if allow_float else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'a number' if allow_float else 'an int'}, got {value!r}")
    if not float(value) > 0:  # type: ignore[arg-type]  # also refuses NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _decode_chunk(data: bytes, start: int, encoding: str | None, errors: str, where: str) -> list[Any]:
    """Records of ``data``, lines starting at byte ``start``; raises ``_PartialDecode`` on bad bytes.

    ``_PartialDecode`` carries the records of the lines before the undecodable one, for the caller
    to deliver before it raises the :class:`SourceDecodeError`.
    """
    try:
        return decode_lines(data, encoding=encoding, errors=errors, where=where, start=start)
    except SourceDecodeError as exc:
        cut = data.rfind(b"\n", 0, exc.offset - start) + 1
        good = decode_lines(data[:cut], encoding=encoding, errors=errors, where=where, start=start)
        raise _PartialDecode(good, exc) from None


def _decode_parts(
    head: bytes, data: bytes, end: int, start: int, encoding: str | None, errors: str, where: str
) -> list[Any]:
    """Records of the lines ``head + data[:end]``, which start at byte ``start``: like
    :func:`_decode_chunk`, without joining the parts unless the block holds undecodable bytes."""
    try:
        return decode_parts(head, data, end, encoding=encoding, errors=errors, where=where, start=start)
    except SourceDecodeError:
        lines = b"".join((head, memoryview(data)[:end])) if head else data[:end]
        return _decode_chunk(lines, start, encoding, errors, where)


class _PartialDecode(Exception):
    """Internal: the good records of a block that holds undecodable bytes, and the error to raise."""

    def __init__(self, good: list[Any], error: SourceDecodeError) -> None:
        super().__init__(str(error))
        self.good = good
        self.error = error


# -- files -------------------------------------------------------------------------------------------


class LineSource(Generic[T]):
    """The lines of a file, read in large blocks; optionally followed as it grows (``follow=True``).

    Made by :func:`read_lines`, which documents the parameters. A ``LineSource`` is a description,
    not an open file: every iteration (``async for``, ``chunks()``, ``blocks()``) opens the file
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
        _check_positive("block_size", block_size)
        _check_positive("max_line_length", max_line_length)
        _check_positive("poll_interval", poll_interval, allow_float=True)
        self.path: str = os.fspath(path)
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
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[list[T], None]:
        encoding, errors, where = self.encoding, self.errors, self.path
        async with aclosing(self._raw()) as raw:
            async for head, data, end, start in raw:
                try:
                    records = _decode_parts(head, data, end, start, encoding, errors, where)
                except _PartialDecode as partial:
                    if partial.good:
                        yield partial.good
                    raise partial.error from partial.error.__cause__
                if records:
                    yield records

    def parts(self) -> AsyncGenerator[tuple[bytes, bytes, int, int], None]:
        """The lines as read, not joined: ``(head, data, end, start)`` tuples.

        The lines of each are ``head + data[:end]`` (``head``: the partial line carried over from
        the read before, often empty; ``data``: the bytes of one read), starting at byte
        ``start``; every tuple holds at least one line. For readers that cut or split the bytes
        where they lie (the pipeline's reader) instead of joining them first, as
        :meth:`blocks` does. Positions restart at 0 after a truncation or rotation, as there.
        """
        return self._raw()

    def blocks(self) -> AsyncGenerator[LineBlock, None]:
        """Raw blocks of complete lines with exact byte positions (no decoding).

        Each block's ``start`` is the ``end`` of the previous one, except after a truncation or a
        rotation of a followed file, where positions restart at 0 in the (new) file. Every block
        holds at least one line.
        """
        return self._blocks()

    async def _blocks(self) -> AsyncGenerator[LineBlock, None]:
        async with aclosing(self._raw()) as raw:
            async for head, data, end, start in raw:
                if head:
                    data = b"".join((head, memoryview(data)[:end]))
                elif end < len(data):
                    data = data[:end]
                count = data.count(b"\n")
                if not data.endswith(b"\n"):
                    count += 1  # the last line of the file, without a newline
                yield LineBlock(data, count, start, start + len(data))

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

    async def _raw(self) -> AsyncGenerator[tuple[bytes, bytes, int, int], None]:
        """The reading and following behind every view: ``(head, data, end, start)`` tuples.

        The lines of each are ``head + data[:end]`` (``head``: the partial line carried from the
        block before, often empty; ``data``: the block as read), starting at byte ``start``. The
        parts are not joined here: decoding splits ``data`` where it lies.
        """
        f, start = await anyio.to_thread.run_sync(self._open)
        new: IO[bytes] | None = None
        splitter = LineSplitter(self.path, start, self.max_line_length)
        read, block_size = f.read, self.block_size
        try:
            while True:
                data = await anyio.to_thread.run_sync(read, block_size)
                if data:
                    parts = splitter.feed_parts(data)
                    if parts is not None:
                        head, end = parts
                        yield head, data, end, splitter.position - len(head) - end
                    splitter.raise_pending()
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
                lines = splitter.finish()
                if lines is not None:
                    yield b"", lines, len(lines), splitter.position - len(lines)
                if not self.follow:
                    return
                if f.tell() > 0:
                    logger.info("%s: truncated, reading again from byte 0", self.path)
                    await anyio.to_thread.run_sync(f.seek, 0)
                else:
                    logger.info("%s: rotated (a new file at the path), reading it from byte 0", self.path)
                splitter.reset(0)
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


# -- TCP ---------------------------------------------------------------------------------------------


def _peer_name(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
    except OSError:  # already reset by the peer
        return "tcp client <disconnected>"
    if isinstance(address, tuple):
        return f"tcp client {address[0]}:{address[1]}"
    return f"tcp client {address}"


class TcpLines(Generic[T]):
    """A TCP server whose records are the lines sent by all of its clients.

    Made by :func:`tcp_lines`, which documents the parameters. Use it as an async context manager:
    the server listens from the first ``async with`` entry to the last exit (nested entries, e.g.
    by ``mb.batches()`` or a pipeline, are harmless). Iterate it with ``async for`` or
    ``chunks()``; the iteration ends when the server stops. Records of different clients
    interleave by socket read; the lines of one client stay in order.
    """

    def __init__(
        self,
        port: int,
        *,
        host: str,
        encoding: str | None,
        errors: str,
        max_line_length: int,
        max_connections: int,
        read_size: int,
        buffer_size: int,
    ) -> None:
        check_encoding(encoding, errors)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int between 0 and 65535 (0: any free port), got {port!r}")
        _check_positive("max_line_length", max_line_length)
        _check_positive("max_connections", max_connections)
        _check_positive("read_size", read_size)
        _check_positive("buffer_size", buffer_size)
        self.host = host
        self.requested_port = port
        self.encoding = encoding
        self.errors = errors
        self.max_line_length = max_line_length
        self.max_connections = max_connections
        self.read_size = read_size
        self.buffer_size = buffer_size
        self._depth = 0
        self._port: int | None = None
        self._active = 0
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._send: MemoryObjectSendStream[list[T]] | None = None
        self._receive: MemoryObjectReceiveStream[list[T]] | None = None
        self._slots: anyio.Semaphore | None = None

    def __repr__(self) -> str:
        state = f"listening on port {self._port}" if self._port is not None else "not started"
        return f"tcp_lines({self.requested_port}, host={self.host!r}) [{state}]"

    @property
    def port(self) -> int:
        """The bound port (the one chosen by the system when created with ``port=0``)."""
        if self._port is None:
            raise RuntimeError(
                f"{self!r}: the port is known once the server runs; "
                f"use 'async with mb.tcp_lines(...) as server:' and read server.port inside"
            )
        return self._port

    @property
    def active_connections(self) -> int:
        """Clients being served now (at most ``max_connections``)."""
        return self._active

    @property
    def buffered_chunks(self) -> int:
        """Chunks read from sockets and waiting for the consumer (at most ``buffer_size``)."""
        if self._receive is None:
            return 0
        return self._receive.statistics().current_buffer_used

    async def __aenter__(self) -> TcpLines[T]:
        if self._depth == 0:
            await self._start()
        self._depth += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._depth -= 1
        if self._depth == 0:
            return await self._stop(exc_type, exc, tb)
        return None

    async def _start(self) -> None:
        try:
            multi = await anyio.create_tcp_listener(local_host=self.host, local_port=self.requested_port)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"tcp_lines cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc} "
                f"(pass port=0 to let the system choose a free port)",
            ) from exc
        self._send, self._receive = anyio.create_memory_object_stream[list[T]](self.buffer_size)
        self._slots = anyio.Semaphore(self.max_connections)
        self._listener = multi
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._port = multi.extra(anyio.abc.SocketAttribute.local_port)
        for listener in multi.listeners:
            # create_tcp_listener makes one listener per address family of ``host``.
            raw = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            task_group.start_soon(self._accept, raw, self._slots, task_group, self._send)
        logger.info("tcp_lines listening on %s:%d", self.host, self._port)

    async def _stop(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, listener, send = self._task_group, self._listener, self._send
        assert task_group is not None and listener is not None and send is not None
        self._task_group = self._listener = None
        self._port = None
        try:
            task_group.cancel_scope.cancel()
            return await task_group.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                # Consumers still iterating drain what was read, then their iteration ends.
                await send.aclose()

    # The server works on the raw non-blocking sockets: a socket is read only when its handler asks
    # for data, so a consumer that stops reading stops the reads at once and TCP flow control
    # blocks the sender. (anyio's asyncio socket streams keep reading an accepted connection into
    # memory until the first receive() has waited, which under uvloop can buffer without bound.)

    async def _accept(
        self,
        listener: socket.socket,
        slots: anyio.Semaphore,
        task_group: anyio.abc.TaskGroup,
        send: MemoryObjectSendStream[list[T]],
    ) -> None:
        """Accept clients while fewer than ``max_connections`` are served; others wait in the backlog."""
        while True:
            await slots.acquire()
            try:
                while True:
                    await anyio.wait_readable(listener)
                    try:
                        client, _ = listener.accept()
                        break
                    except BlockingIOError:  # another process or a reset connection took it
                        continue
                    except OSError as exc:  # e.g. too many open files: log, wait, go on
                        logger.error("tcp_lines on port %s: accept failed: %s", self._port, exc)
                        await anyio.sleep(0.1)
            except BaseException:
                slots.release()
                raise
            client.setblocking(False)
            task_group.start_soon(self._serve_client, client, slots, send)

    async def _serve_client(
        self, sock: socket.socket, slots: anyio.Semaphore, send: MemoryObjectSendStream[list[T]]
    ) -> None:
        peer = _peer_name(sock)
        splitter = LineSplitter(peer, 0, self.max_line_length)
        read_size = self.read_size
        self._active += 1
        try:
            while True:
                await anyio.wait_readable(sock)
                try:
                    data = sock.recv(read_size)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    break  # reset by the peer: deliver what was complete, like a close
                if not data:
                    break
                lines = splitter.feed(data)
                if lines is not None:
                    await self._deliver(send, lines, splitter.position - len(lines), peer)
                splitter.raise_pending()
            lines = splitter.finish()
            if lines is not None:
                await self._deliver(send, lines, splitter.position - len(lines), peer)
        except (LineTooLong, SourceDecodeError) as exc:
            logger.error("%s; connection closed, other clients go on", exc)
        except OSError as exc:
            logger.error("%s: connection failed: %s", peer, exc)
        finally:
            self._active -= 1
            slots.release()
            sock.close()

    async def _deliver(
        self, send: MemoryObjectSendStream[list[T]], lines: bytes, start: int, peer: str
    ) -> None:
        try:
            records = _decode_chunk(lines, start, self.encoding, self.errors, peer)
        except _PartialDecode as partial:
            if partial.good:
                await send.send(partial.good)
            raise partial.error from partial.error.__cause__
        if records:
            await send.send(records)

    def _stream(self) -> MemoryObjectReceiveStream[list[T]]:
        if self._receive is None or self._task_group is None:
            raise RuntimeError(
                f"{self!r}: the server is not running; iterate inside "
                f"'async with mb.tcp_lines(...) as server: async for line in server: ...'"
            )
        return self._receive

    def chunks(self) -> AsyncGenerator[list[T], None]:
        """The records, one non-empty list per socket read of one client, until the server stops.

        Raises ``RuntimeError`` when called outside ``async with``.
        """
        return self._chunks(self._stream())

    async def _chunks(self, receive: MemoryObjectReceiveStream[list[T]]) -> AsyncGenerator[list[T], None]:
        async for chunk in receive:
            yield chunk

    def __aiter__(self) -> AsyncGenerator[T, None]:
        return self._lines(self._stream())

    async def _lines(self, receive: MemoryObjectReceiveStream[list[T]]) -> AsyncGenerator[T, None]:
        async for chunk in receive:
            for line in chunk:
                yield line


@overload
def tcp_lines(
    port: int = ...,
    *,
    host: str = ...,
    encoding: str = ...,
    errors: str = ...,
    max_line_length: int = ...,
    max_connections: int = ...,
    read_size: int = ...,
    buffer_size: int = ...,
) -> TcpLines[str]: ...


@overload
def tcp_lines(
    port: int = ...,
    *,
    host: str = ...,
    encoding: None,
    errors: str = ...,
    max_line_length: int = ...,
    max_connections: int = ...,
    read_size: int = ...,
    buffer_size: int = ...,
) -> TcpLines[bytes]: ...


def tcp_lines(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    encoding: str | None = "utf-8",
    errors: str = "strict",
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    read_size: int = DEFAULT_READ_SIZE,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> TcpLines[Any]:
    """A TCP server on ``host:port`` whose records are the lines sent by all of its clients.

    ``async with tcp_lines(0) as server:`` starts it (``server.port`` is the bound port);
    ``async for line in server`` yields the lines without ``\\n``/``\\r\\n``.

    - ``host`` (default ``"127.0.0.1"``): the loopback interface only. Pass ``"0.0.0.0"`` or
      ``"::"`` deliberately to accept other machines.
    - ``encoding`` (default ``"utf-8"``, ASCII-compatible codecs only; ``None`` yields ``bytes``)
      and ``errors`` (default ``"strict"``).
    - ``max_line_length`` (default 1 MiB): a client sending a longer line, or undecodable bytes
      with ``errors="strict"``, gets its connection closed, with an error logged on the
      ``microbatch.sources`` logger naming the peer and the byte offset in that connection; the lines
      it sent before are delivered, other clients go on.
    - ``max_connections`` (default 100): further clients wait in the listen backlog (their connect
      succeeds, their data waits in socket buffers) until a served client disconnects; they are not
      refused.
    - ``read_size`` (default 64 KiB) bytes per socket read; ``buffer_size`` (default 16) chunks held
      for a consumer that does not read. Memory is bounded by about ``buffer_size * read_size``
      plus ``max_connections * (max_line_length + read_size)``: when the consumer stops reading,
      the server stops reading its sockets and TCP flow control blocks the senders.

    A client that closes after a last line without a newline delivers that line. A TCP source has
    no positions: a pipeline cannot resume it after a crash, lines sent meanwhile are lost.
    """
    return TcpLines(
        port,
        host=host,
        encoding=encoding,
        errors=errors,
        max_line_length=max_line_length,
        max_connections=max_connections,
        read_size=read_size,
        buffer_size=buffer_size,
    )
