"""Serving the clients of a :class:`~microbatch.sources.tcp.TcpLines` server: accept, read, limit.

The server works on the raw non-blocking sockets: a socket is read only when its handler asks for
data, so a consumer that stops reading stops the reads at once and TCP flow control blocks the
sender. (anyio's asyncio socket streams keep reading an accepted connection into memory until the
first receive() has waited, which under uvloop can buffer without bound.) Each connection is read
by its own :class:`LineReader`; the decisions about idle, evicted and over-budget connections are
:class:`ConnectionTable`'s.
"""

from __future__ import annotations

import logging
import socket
from typing import Generic, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from .._exceptions import LineTooLong, SourceDecodeError
from .._waits import wait_until
from .connections import Connection, ConnectionTable
from .linereader import LineReader
from .protocol import Part

__all__ = ["Clients"]

logger = logging.getLogger("microbatch.sources")

#: Reads of one connection after a stop, at most, for the lines it had sent already.
DRAIN_READS = 16

T = TypeVar("T", str, bytes)


async def _recv(sock: socket.socket, size: int) -> bytes:
    """One read of a client socket; ``b""`` when the client closed or reset the connection."""
    while True:
        await anyio.wait_readable(sock)
        try:
            return sock.recv(size)
        except BlockingIOError:
            continue
        except ConnectionError:
            return b""  # reset by the peer: deliver what was complete, like a close


def _peer_name(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
    except OSError:  # already reset by the peer
        return "tcp client <disconnected>"
    if isinstance(address, tuple):
        return f"tcp client {address[0]}:{address[1]}"
    return f"tcp client {address}"


class Clients(Generic[T]):
    """The clients of one running server: at most ``max_connections`` served, records to ``send``."""

    def __init__(
        self,
        send: MemoryObjectSendStream[list[T]],
        table: ConnectionTable,
        *,
        max_connections: int,
        max_line_length: int,
        encoding: str | None,
        errors: str,
        read_size: int,
        name: str,
    ) -> None:
        self.send: MemoryObjectSendStream[list[T]] = send
        self.table = table
        self.slots = anyio.Semaphore(max_connections)
        self.max_line_length = max_line_length
        self.encoding = encoding
        self.errors = errors
        self.read_size = read_size
        self.name = name
        #: Set by :meth:`stop`: no more accepts and no more waiting for data.
        self.stopped = False
        self._scopes: set[anyio.CancelScope] = set()  # accept loops and waits for data
        self._serving = 0
        self._idle = anyio.Event()

    def stop(self) -> None:
        """Stop intake: accept no client and wait for no data; each connection delivers the complete
        lines it holds or can read without waiting, then closes. :meth:`wait_stopped` waits for it."""
        self.stopped = True
        for scope in list(self._scopes):
            scope.cancel()
        if not self._serving:
            self._idle.set()

    async def wait_stopped(self) -> None:
        """Wait until, after :meth:`stop`, every connection has delivered its lines and closed."""
        await self._idle.wait()

    async def accept(self, listener: socket.socket, task_group: anyio.abc.TaskGroup) -> None:
        """Accept clients while a slot is free or one can be evicted; others wait in the backlog."""
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            if self.stopped:
                return
            await self._accept(listener, task_group)

    async def _accept(self, listener: socket.socket, task_group: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.wait_readable(listener)  # a client waits to be accepted
            await self._take_slot()
            try:
                client, _ = listener.accept()
            except BlockingIOError:  # another process or a reset connection took it
                self.slots.release()
                continue
            except OSError as exc:  # e.g. too many open files: log, wait, go on
                self.slots.release()
                logger.error("%s: accept failed: %s", self.name, exc)
                await anyio.sleep(0.1)
                continue
            client.setblocking(False)
            task_group.start_soon(self.serve, client)

    async def _take_slot(self) -> None:
        """A free slot, made by evicting the longest-idle connection if it has to be."""
        table = self.table
        while True:
            if await wait_until(table.eviction_time(anyio.current_time()), self.slots.acquire):
                return
            victim = table.evict(anyio.current_time())
            if victim is not None:
                self._close(victim, logging.WARNING)
                await self.slots.acquire()  # released by the victim as it stops
                return

    @staticmethod
    def _close(conn: Connection, level: int) -> None:
        logger.log(level, "%s", conn.closing)
        conn.handle.cancel()

    async def serve(self, sock: socket.socket) -> None:
        """Read one client until it closes, faults or is closed by a limit; release its slot."""
        table = self.table
        self._serving += 1
        conn = Connection(_peer_name(sock), anyio.current_time())
        reader = LineReader(
            conn.peer, max_line_length=self.max_line_length, encoding=self.encoding, errors=self.errors
        )
        try:
            with anyio.CancelScope() as scope:
                conn.handle = scope
                table.add(conn)
                await self._read(sock, conn, reader)
        except (LineTooLong, SourceDecodeError) as exc:
            logger.error("%s; connection closed, other clients go on", exc)
        except OSError as exc:
            logger.error("%s: connection failed: %s", conn.peer, exc)
        finally:
            table.remove(conn)
            self.slots.release()
            sock.close()
            self._serving -= 1
            if self.stopped and not self._serving:
                self._idle.set()

    async def _read(self, sock: socket.socket, conn: Connection, reader: LineReader) -> None:
        table, size = self.table, self.read_size
        received: list[bytes] = []

        async def receive() -> None:
            received.append(await _recv(sock, size))

        while True:
            arrived = False
            with anyio.CancelScope() as waiting:
                self._scopes.add(waiting)
                if self.stopped:
                    waiting.cancel()
                arrived = await wait_until(table.idle_deadline(conn), receive)
            self._scopes.discard(waiting)
            if waiting.cancel_called and not received:
                await self._drain(sock, reader)
                return
            if not arrived and not received:
                logger.warning(
                    "%s: no complete line for idle_timeout=%s s; connection closed",
                    conn.peer,
                    table.idle_timeout,
                )
                return
            data = received.pop()
            part = reader.feed(data) if data else reader.finish()
            victim = table.held(conn, reader.pending)
            if victim is not None and victim is not conn:
                self._close(victim, logging.ERROR)
            if part is not None:
                conn.busy = True
                await self._deliver(reader, part)
                table.delivered(conn, anyio.current_time())
            if victim is conn:
                logger.error("%s", conn.closing)
                return
            if not data:
                return
            reader.raise_pending()

    async def _drain(self, sock: socket.socket, reader: LineReader) -> None:
        """After :meth:`stop`: deliver the lines the socket holds now, without waiting for more.

        A partial last line is not a record (its client has not finished it) and is dropped. At
        most ``DRAIN_READS`` reads: a client sending without pause cannot hold the stop.
        """
        for _ in range(DRAIN_READS):
            try:
                data = sock.recv(self.read_size)
            except (BlockingIOError, ConnectionError):
                data = b""
            if not data:
                return
            part = reader.feed(data)
            if part is not None:
                await self._deliver(reader, part)
            reader.raise_pending()

    async def _deliver(self, reader: LineReader, part: Part) -> None:
        """Send the records of ``part``; the good lines before undecodable bytes go first."""
        records, error = reader.records(part)
        if records:
            await self.send.send(records)
        if error is not None:
            raise error from error.__cause__
