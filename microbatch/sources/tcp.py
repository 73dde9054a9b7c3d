"""A TCP server whose records are the lines sent by all of its clients: :func:`tcp_lines`.

Each connection is read by its own :class:`~microbatch.sources.linereader.LineReader` (the line
reader of files and stdin), so limits and decoding behave the same; a fault closes only the
connection it came from.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._core.lines import check_encoding
from .._core.params import check_int, check_seconds
from .connections import ConnectionTable
from .linereader import DEFAULT_MAX_LINE_LENGTH
from .tcpserve import Clients

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_EVICT_AFTER",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_READ_SIZE",
    "TcpLines",
    "tcp_lines",
]

logger = logging.getLogger("microbatch.sources")

T = TypeVar("T", str, bytes)

#: Most TCP clients served at once by default.
DEFAULT_MAX_CONNECTIONS = 100
#: Bytes asked of a socket per read.
DEFAULT_READ_SIZE = 1 << 16
#: Chunks (one per socket read) a TCP server holds for a consumer that does not read.
DEFAULT_BUFFER_SIZE = 16
#: Seconds a connection may go without completing a line before it is closed.
DEFAULT_IDLE_TIMEOUT = 300.0
#: Seconds without a complete line after which a connection may be evicted for a waiting client.
DEFAULT_EVICT_AFTER = 1.0
#: Bytes of partial lines held across all connections of one server.
DEFAULT_MAX_BUFFERED_BYTES = 16 << 20


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
        idle_timeout: float | None = None,
        evict_after: float | None = None,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
        stop_when_idle: float | None = None,
    ) -> None:
        check_encoding(encoding, errors)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int between 0 and 65535 (0: any free port), got {port!r}")
        check_int("max_line_length", max_line_length, minimum=1)
        check_int("max_connections", max_connections, minimum=1)
        check_int("read_size", read_size, minimum=1)
        check_int("buffer_size", buffer_size, minimum=1)
        if idle_timeout is not None:
            check_seconds("idle_timeout", idle_timeout)
        if evict_after is not None:
            check_seconds("evict_after", evict_after, allow_zero=True)
        check_int("max_buffered_bytes", max_buffered_bytes, minimum=1)
        if stop_when_idle is not None:
            check_seconds("stop_when_idle", stop_when_idle)
        self.host = host
        self.requested_port = port
        self.encoding = encoding
        self.errors = errors
        self.max_line_length = max_line_length
        self.max_connections = max_connections
        self.read_size = read_size
        self.buffer_size = buffer_size
        self.idle_timeout = idle_timeout
        self.evict_after = evict_after
        self.max_buffered_bytes = max_buffered_bytes
        self.stop_when_idle = stop_when_idle
        #: The server stopped taking lines because no client sent any for ``stop_when_idle`` s.
        self.idle_ended = False
        self._depth = 0
        self._port: int | None = None
        self._table: ConnectionTable | None = None
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._send: MemoryObjectSendStream[list[T]] | None = None
        self._receive: MemoryObjectReceiveStream[list[T]] | None = None
        self._clients: Clients[T] | None = None

    def __repr__(self) -> str:
        state = f"listening on port {self._port}" if self._port is not None else "not started"
        return f"tcp_lines({self.requested_port}, host={self.host!r}) [{state}]"

    def describe(self) -> str:
        """``"tcp"``: what arrives on a socket is not named by where it listens."""
        return "tcp"

    def resume(self, position: Any) -> TcpLines[T]:
        """This server itself: lines sent to it cannot be read again, so a resumed run goes on
        with what arrives next (``position`` is ignored)."""
        return self

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
        return 0 if self._table is None else len(self._table)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of partial lines held across all connections (at most ``max_buffered_bytes``)."""
        return 0 if self._table is None else self._table.buffered

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
        self._table = ConnectionTable(
            idle_timeout=self.idle_timeout,
            evict_after=self.evict_after,
            max_buffered_bytes=self.max_buffered_bytes,
        )
        self._listener = multi
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._port = multi.extra(anyio.abc.SocketAttribute.local_port)
        clients = Clients(
            self._send,
            self._table,
            max_connections=self.max_connections,
            max_line_length=self.max_line_length,
            encoding=self.encoding,
            errors=self.errors,
            read_size=self.read_size,
            name=f"tcp_lines on {self.host}:{self._port}",
        )
        self._clients = clients
        for listener in multi.listeners:
            # create_tcp_listener makes one listener per address family of ``host``.
            raw = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            task_group.start_soon(clients.accept, raw, task_group)
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address, as in a URL
        logger.info("listening on tcp://%s:%d", host, self._port)
        self.idle_ended = False
        if self.stop_when_idle is not None:
            task_group.start_soon(self._stop_when_idle, clients, self.stop_when_idle)

    async def _stop_when_idle(self, clients: Clients[T], quiet: float) -> None:
        """Stop intake (:meth:`stop_intake`) once no client connected or sent data for ``quiet`` s."""
        while not clients.stopped:
            left = clients.last_activity + quiet - anyio.current_time()
            if left <= 0:
                logger.info("tcp_lines on %s:%s: nothing received for stop_when_idle=%g s",
                            self.host, self._port, quiet)
                self.idle_ended = True
                self.stop_intake()
                return
            await anyio.sleep(left)

    def stop_intake(self) -> None:
        """Stop taking lines, gracefully: for a pipeline stopped by ``Run.stop()`` or SIGTERM.

        The server accepts no more clients and waits for no more data; each connection delivers the
        complete lines it has received or can read at once (a partial last line is dropped: its
        client did not finish it) and closes; then the iteration ends once the consumer has taken
        every buffered chunk. So every line the server had read before the stop is delivered;
        only lines still in flight in the network are not. Calling it again, or on a server that
        is not running, does nothing.
        """
        clients, task_group, send = self._clients, self._task_group, self._send
        if clients is None or task_group is None or send is None or clients.stopped:
            return
        clients.stop()
        logger.info("tcp_lines on %s:%s: stopped taking lines; delivering what was read", self.host,
                    self._port)

        async def close_when_drained() -> None:
            await clients.wait_stopped()
            await send.aclose()  # consumers take what is buffered, then their iteration ends

        task_group.start_soon(close_when_drained)

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
        self._clients = None
        try:
            task_group.cancel_scope.cancel()
            # The server's own tasks are cancelled; an error of the block goes on as it is, not
            # wrapped in an exception group with them.
            await task_group.__aexit__(None, None, None)
            return None
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                # Consumers still iterating drain what was read, then their iteration ends.
                await send.aclose()

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
    idle_timeout: float | None = ...,
    evict_after: float | None = ...,
    max_buffered_bytes: int = ...,
    stop_when_idle: float | None = ...,
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
    idle_timeout: float | None = ...,
    evict_after: float | None = ...,
    max_buffered_bytes: int = ...,
    stop_when_idle: float | None = ...,
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
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    evict_after: float | None = DEFAULT_EVICT_AFTER,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    stop_when_idle: float | None = None,
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
      succeeds, their data waits in socket buffers) until a slot frees; they are not refused.
    - ``evict_after`` (default 1 s; None: never): while every slot is taken and a client waits,
      the connection that has gone longest without completing a line is closed to make room,
      once that is longer than ``evict_after``, so idle or trickling clients cannot hold every
      slot. Connections whose lines wait for a consumer that does not read are not evicted.
    - ``idle_timeout`` (default 300 s; None: never): a connection that completes no line for this
      long is closed (its partial line is dropped), also when slots are free.
    - ``max_buffered_bytes`` (default 16 MiB): bound on the partial lines held across all
      connections; a read that goes over it closes the connection holding the longest partial
      line (an error names it), the others go on.
    - ``read_size`` (default 64 KiB) bytes per socket read; ``buffer_size`` (default 16) chunks held
      for a consumer that does not read. Memory is bounded by about ``buffer_size * read_size``
      plus ``max_buffered_bytes`` plus ``max_connections * read_size``: when the consumer stops
      reading, the server stops reading its sockets and TCP flow control blocks the senders.
    - ``stop_when_idle`` (default None: never): once no client has connected or sent data for this
      many seconds, the server stops taking lines as :meth:`TcpLines.stop_intake` does: what it
      has received is delivered, then the iteration ends. A pipeline writes its final checkpoint
      (not ``finished``); the next run over a new server continues from its value.

    Closing a connection for one of these limits logs it on the ``microbatch.sources`` logger,
    naming the peer and the limit.

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
        idle_timeout=idle_timeout,
        evict_after=evict_after,
        max_buffered_bytes=max_buffered_bytes,
        stop_when_idle=stop_when_idle,
    )
