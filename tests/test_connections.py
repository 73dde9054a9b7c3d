"""The TCP server's decisions about its clients, with explicit times (no sockets, no event loop)."""

from __future__ import annotations

from microbatch.sources.connections import Connection, ConnectionTable


def _table(
    idle_timeout: float | None = 10.0, evict_after: float | None = 1.0, max_buffered_bytes: int = 100
) -> ConnectionTable:
    return ConnectionTable(
        idle_timeout=idle_timeout, evict_after=evict_after, max_buffered_bytes=max_buffered_bytes
    )


def test_idleness_counts_from_the_last_completed_line() -> None:
    table = _table()
    conn = Connection("a", now=5.0)
    table.add(conn)
    assert table.idle_deadline(conn) == 15.0
    table.delivered(conn, 8.0)
    assert table.idle_deadline(conn) == 18.0
    assert _table(idle_timeout=None).idle_deadline(conn) is None


def test_the_longest_idle_connection_is_evicted_once_past_evict_after() -> None:
    table = _table()
    old, new, busy = Connection("old", 1.0), Connection("new", 2.0), Connection("busy", 0.0)
    busy.busy = True  # waiting for the consumer: not the client's doing
    for conn in (old, new, busy):
        table.add(conn)
    assert table.eviction_time(now=1.5) == 2.0
    assert table.evict(now=1.9) is None
    victim = table.evict(now=2.0)
    assert victim is old and old.closing is not None and "evict_after=1.0" in old.closing
    # The one being closed is not chosen again; the next candidate is later.
    assert table.eviction_time(now=2.0) == 3.0
    assert table.evict(now=2.5) is None


def test_no_candidate_looks_again_later_and_eviction_can_be_off() -> None:
    table = _table()
    conn = Connection("busy", 0.0)
    conn.busy = True
    table.add(conn)
    assert table.eviction_time(now=7.0) == 8.0
    assert table.evict(now=100.0) is None
    off = _table(evict_after=None)
    off.add(Connection("idle", 0.0))
    assert off.eviction_time(now=50.0) is None and off.evict(now=50.0) is None


def test_going_over_the_byte_budget_closes_the_largest_holder() -> None:
    table = _table(max_buffered_bytes=100)
    a, b = Connection("a", 0.0), Connection("b", 0.0)
    table.add(a)
    table.add(b)
    assert table.held(a, 70) is None
    assert table.held(b, 20) is None
    assert table.buffered == 90
    victim = table.held(b, 40)  # 110 > 100: a holds the most
    assert victim is a and a.closing is not None and "max_buffered_bytes=100" in a.closing
    assert table.buffered == 40
    table.remove(a)  # its bytes were already taken off
    assert table.buffered == 40
    assert table.held(b, 120) is b  # the reader itself may be the largest
    assert table.buffered == 0
    table.remove(b)
    assert table.buffered == 0 and len(table) == 0


def test_a_connection_that_ends_gives_back_its_bytes() -> None:
    table = _table()
    conn = Connection("a", 0.0)
    table.add(conn)
    table.held(conn, 30)
    table.held(conn, 10)  # its partial line was completed, a shorter one started
    assert table.buffered == 10
    table.remove(conn)
    assert table.buffered == 0
