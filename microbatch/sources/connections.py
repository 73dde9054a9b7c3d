"""The TCP server's bookkeeping of its clients, and its decisions on them (pure: times are given).

Three limits keep a few clients from starving the others or the memory:

- ``idle_timeout``: a connection that has not completed a line for this long is closed (an idle
  client, or one that sends a byte now and then without a newline);
- ``evict_after``: when every slot is taken and another client waits, the connection that has gone
  longest without completing a line is closed, once that is longer than ``evict_after``;
- ``max_buffered_bytes``: the partial lines held across all connections are bounded; when a read
  goes over, the connection holding the longest partial line is closed.

A connection busy handing records to a consumer that does not read is neither idle nor evictable:
it waits because of backpressure, not because of its client.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Connection", "ConnectionTable"]


class Connection:
    """One client being served: its name, when it last completed a line, its partial-line bytes."""

    __slots__ = ("peer", "last_line", "pending", "busy", "closing", "handle")

    def __init__(self, peer: str, now: float) -> None:
        self.peer = peer
        #: When the client last completed a line (or connected): idleness counts from here.
        self.last_line = now
        #: Bytes of its partial last line held by the server.
        self.pending = 0
        #: True while its records wait for the consumer (backpressure, not the client's doing).
        self.busy = False
        #: Why the server closes it (set once, when it is chosen), else None.
        self.closing: str | None = None
        #: The shell's handle to stop it (a cancel scope).
        self.handle: Any = None

    def __repr__(self) -> str:
        return f"Connection({self.peer}, last_line={self.last_line}, pending={self.pending})"


class ConnectionTable:
    """The clients being served and the decisions the three limits make about them.

    ``idle_timeout`` and ``evict_after`` are seconds or None (never); ``max_buffered_bytes`` is a
    byte count. Every method takes the current time where it matters; none waits.
    """

    def __init__(
        self, *, idle_timeout: float | None, evict_after: float | None, max_buffered_bytes: int
    ) -> None:
        self.idle_timeout = idle_timeout
        self.evict_after = evict_after
        self.max_buffered_bytes = max_buffered_bytes
        self.connections: dict[int, Connection] = {}
        #: Bytes of partial lines held across all connections not being closed.
        self.buffered = 0

    def __len__(self) -> int:
        return len(self.connections)

    def add(self, conn: Connection) -> None:
        self.connections[id(conn)] = conn

    def remove(self, conn: Connection) -> None:
        if self.connections.pop(id(conn), None) is not None and conn.closing is None:
            self.buffered -= conn.pending
        conn.pending = 0

    def delivered(self, conn: Connection, now: float) -> None:
        """``conn`` completed lines and the consumer took them at ``now``."""
        conn.busy = False
        conn.last_line = now

    def idle_deadline(self, conn: Connection) -> float | None:
        """When ``conn`` is closed for idleness unless it completes a line first (None: never)."""
        if self.idle_timeout is None:
            return None
        return conn.last_line + self.idle_timeout

    def held(self, conn: Connection, pending: int) -> Connection | None:
        """``conn`` now holds ``pending`` bytes of a partial line; return a connection to close.

        When the total goes over ``max_buffered_bytes``, the connection holding the most is
        chosen (marked ``closing``, its bytes no longer counted), possibly ``conn`` itself.
        """
        if conn.closing is not None:
            return None
        self.buffered += pending - conn.pending
        conn.pending = pending
        if self.buffered <= self.max_buffered_bytes:
            return None
        victim = max((c for c in self.connections.values() if c.closing is None), key=lambda c: c.pending)
        victim.closing = (
            f"{victim.peer}: {self.buffered} bytes of partial lines held across all connections "
            f"exceed max_buffered_bytes={self.max_buffered_bytes}; this connection held the most "
            f"({victim.pending} bytes) and is closed, other clients go on"
        )
        self.buffered -= victim.pending
        return victim

    def eviction_time(self, now: float) -> float | None:
        """When a connection can be evicted for a waiting client (None: eviction is off).

        With no candidate now (every connection busy), the answer is ``now + evict_after``: look
        again then.
        """
        if self.evict_after is None:
            return None
        times = [c.last_line for c in self.connections.values() if not c.busy and c.closing is None]
        return (min(times) if times else now) + self.evict_after

    def evict(self, now: float) -> Connection | None:
        """The connection to close for a waiting client at ``now``, marked ``closing``, or None."""
        if self.evict_after is None:
            return None
        candidates = [c for c in self.connections.values() if not c.busy and c.closing is None]
        if not candidates:
            return None
        victim = min(candidates, key=lambda c: c.last_line)
        idle = now - victim.last_line
        if idle < self.evict_after:
            return None
        victim.closing = (
            f"{victim.peer}: no complete line for {idle:.1f} s while every slot was taken and "
            f"another client waited (evict_after={self.evict_after} s); connection closed"
        )
        self.buffered -= victim.pending
        return victim
