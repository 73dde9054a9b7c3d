"""tcp_lines: a real TCP server on 127.0.0.1 with real clients."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.abc
import psutil
import pytest

import microbatch as mb
from microbatch.sources import Source

pytestmark = pytest.mark.anyio

SAFETY = 20  # seconds; a net for a stuck test, never what decides an outcome


async def _connect(server: mb.TcpLines[Any]) -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", server.port)


async def _take(it: Any, n: int) -> list[Any]:
    out = []
    for _ in range(n):
        out.append(await it.__anext__())
    return out


async def _closed_by_peer(stream: anyio.abc.SocketStream) -> bool:
    """True once the server has closed this connection (EOF or reset)."""
    try:
        while await stream.receive():
            pass
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True
    return False  # pragma: no cover


async def test_lines_terminators_and_last_line_without_newline() -> None:
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            assert server.port > 0
            lines = server.__aiter__()
            client = await _connect(server)
            await client.send(b"one\ntwo\r\nthr")
            await client.send(b"ee\n\nlast")
            await client.aclose()
            assert await _take(lines, 5) == ["one", "two", "three", "", "last"]


async def test_bytes_mode_and_chunks() -> None:
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0, encoding=None) as server:
            chunks = server.chunks()
            async with await _connect(server) as client:
                await client.send(b"a\nb\n")
                assert await chunks.__anext__() == [b"a", b"b"]
                await client.send(b"\xff\n")
                assert await chunks.__anext__() == [b"\xff"]


async def test_binds_loopback_by_default() -> None:
    async with mb.tcp_lines(0) as server:
        listening = [
            c
            for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
        ]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]


async def test_many_clients_every_line_once_in_client_order() -> None:
    clients, per_client = 20, 200

    async def client(i: int, port: int) -> None:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            payload = "".join(f"{i}:{j}\n" for j in range(per_client)).encode()
            for k in range(0, len(payload), 333):  # split lines across sends
                await stream.send(payload[k : k + 333])

    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server, anyio.create_task_group() as tg:
            for i in range(clients):
                tg.start_soon(client, i, server.port)
            got = await _take(server.__aiter__(), clients * per_client)
    by_client: dict[int, list[int]] = {}
    for line in got:
        i, j = map(int, line.split(":"))
        by_client.setdefault(i, []).append(j)
    assert by_client == {i: list(range(per_client)) for i in range(clients)}


async def test_over_long_line_closes_only_that_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="microbatch.sources")
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0, max_line_length=10) as server:
            lines = server.__aiter__()
            bad = await _connect(server)
            good = await _connect(server)
            await bad.send(b"fine\n" + b"x" * 11 + b"\nnever\n")
            assert await lines.__anext__() == "fine"
            assert await _closed_by_peer(bad)
            await good.send(b"still here\n")
            assert await lines.__anext__() == "still here"
            await good.aclose()
            await bad.aclose()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(messages) == 1
    assert "tcp client 127.0.0.1:" in messages[0]
    assert "byte offset 5" in messages[0] and "max_line_length=10" in messages[0]


async def test_undecodable_bytes_close_only_that_client(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="microbatch.sources")
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            lines = server.__aiter__()
            bad = await _connect(server)
            await bad.send(b"ok\nb\xffd\n")
            assert await lines.__anext__() == "ok"
            assert await _closed_by_peer(bad)
            async with await _connect(server) as good:
                await good.send(b"next\n")
                assert await lines.__anext__() == "next"
            await bad.aclose()
    assert any("byte offset 4" in r.getMessage() for r in caplog.records)


async def test_max_connections_makes_further_clients_wait() -> None:
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0, max_connections=1) as server:
            lines = server.__aiter__()
            first = await _connect(server)
            await first.send(b"a1\n")
            assert await lines.__anext__() == "a1"
            second = await _connect(server)  # the kernel completes the handshake (backlog)
            await second.send(b"b1\n")
            await first.send(b"a2\n")
            # b1 was sent before a2, yet only the served client's line comes through.
            assert await lines.__anext__() == "a2"
            assert server.active_connections == 1
            await first.aclose()
            assert await lines.__anext__() == "b1"
            await second.aclose()


async def test_backpressure_blocks_the_sender_and_bounds_the_buffer() -> None:
    line = b"y" * 999 + b"\n"
    total_lines = 48 * 1024  # 48 MiB: far more than loopback socket buffers hold
    sent = 0

    async def sender(port: int) -> None:
        nonlocal sent
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            batch = line * 64
            for _ in range(total_lines // 64):
                await stream.send(batch)
                sent += 64

    with anyio.fail_after(60):
        async with (
            mb.tcp_lines(0, buffer_size=4, read_size=1 << 16) as server,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(sender, server.port)
            await anyio.wait_all_tasks_blocked()
            # Nobody reads: the server stopped reading, the kernel buffers filled, the sender waits.
            assert 0 < sent < total_lines
            assert server.buffered_chunks <= 4
            # Reading again lets everything through, every line once.
            received = 0
            async for chunk in server.chunks():
                received += len(chunk)
                if received == total_lines:
                    break
            assert sent == total_lines


async def test_cancellation_leaves_no_task_and_closes_sockets() -> None:
    before = len(anyio.get_running_tasks())
    with anyio.fail_after(SAFETY):
        server = mb.tcp_lines(0)
        client: anyio.abc.SocketStream | None = None
        with anyio.CancelScope() as scope:
            async with server:
                port = server.port
                client = await _connect(server)
                await client.send(b"x\n")
                async for _ in server:
                    scope.cancel()
        assert scope.cancelled_caught
        assert len(anyio.get_running_tasks()) == before
        assert client is not None
        assert await _closed_by_peer(client)
        await client.aclose()
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


async def test_nested_entry_runs_one_server_until_the_last_exit() -> None:
    with anyio.fail_after(SAFETY):
        server = mb.tcp_lines(0)
        async with server:
            port = server.port
            async with server as inner:
                assert inner is server and server.port == port
            # Still running after the inner exit.
            async with await _connect(server) as client:
                await client.send(b"after inner exit\n")
                assert await server.__aiter__().__anext__() == "after inner exit"
        with pytest.raises(RuntimeError, match="async with"):
            server.port  # noqa: B018
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


async def test_iteration_ends_when_the_server_stops() -> None:
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            lines = server.__aiter__()
            async with await _connect(server) as client:
                await client.send(b"only\n")
            assert await lines.__anext__() == "only"
        # The server stopped: an iteration started while it ran ends instead of waiting forever.
        assert [line async for line in lines] == []


async def test_iterating_before_entering_is_a_clear_error() -> None:
    server = mb.tcp_lines(0)
    with pytest.raises(RuntimeError, match=r"async with mb\.tcp_lines"):
        server.__aiter__()
    with pytest.raises(RuntimeError, match=r"async with mb\.tcp_lines"):
        server.chunks()
    with pytest.raises(RuntimeError, match=r"server\.port"):
        server.port  # noqa: B018


async def test_port_in_use_names_host_and_port() -> None:
    async with mb.tcp_lines(0) as first:
        with pytest.raises(OSError, match=f"127\\.0\\.0\\.1:{first.port}"):
            async with mb.tcp_lines(first.port):
                pass


def test_invalid_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="port"):
        mb.tcp_lines(70000)
    with pytest.raises(ValueError, match="max_connections"):
        mb.tcp_lines(0, max_connections=0)
    with pytest.raises(ValueError, match="max_line_length"):
        mb.tcp_lines(0, max_line_length=0)
    with pytest.raises(ValueError, match="ASCII-compatible"):
        mb.tcp_lines(0, encoding="utf-32")


async def test_protocol_describe_and_resume_is_the_same_server() -> None:
    server = mb.tcp_lines(0)
    assert isinstance(server, Source)
    assert server.describe() == "tcp"
    assert server.resume({"chunk": None, "skip": 3}) is server
    async with server:
        async with await _connect(server) as client:
            await client.send(b"x\n")
            chunk = await server.chunks().__anext__()
    # Plain lists, not Chunks: a TCP server's records have no positions.
    assert type(chunk) is list and chunk == ["x"]


async def _until(condition: Any) -> None:
    """Wait for a condition on the server's state (never what decides an outcome)."""
    with anyio.fail_after(SAFETY):
        while not condition():
            await anyio.sleep(0.01)


async def test_idle_clients_holding_every_slot_are_evicted_for_a_waiting_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with mb.tcp_lines(0, max_connections=3, evict_after=0.05) as server:
        chunks = server.chunks()
        idle = []
        for i in range(3):
            client = await _connect(server)
            await client.send(b"idle %d\n" % i)
            idle.append(client)
            assert await chunks.__anext__() == [f"idle {i}"]  # served, then silent
        good = await _connect(server)  # waits in the backlog: every slot is taken
        await good.send(b"hello\n")
        with anyio.fail_after(SAFETY):
            assert await chunks.__anext__() == ["hello"]
            assert await _closed_by_peer(idle[0])  # the longest idle
        assert server.active_connections == 3
        for client in (*idle, good):
            await client.aclose()
    assert "evict_after=0.05" in caplog.text and "tcp client 127.0.0.1:" in caplog.text


async def test_a_client_that_completes_no_line_is_closed_after_idle_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with mb.tcp_lines(0, idle_timeout=0.05) as server:
        chunks = server.chunks()
        async with await _connect(server) as client:
            await client.send(b"a\npartial")
            assert await chunks.__anext__() == ["a"]
            with anyio.fail_after(SAFETY):
                assert await _closed_by_peer(client)
        await _until(lambda: server.active_connections == 0)
        # Its partial line was dropped, not delivered.
        assert server.buffered_chunks == 0
    assert "idle_timeout=0.05" in caplog.text


async def test_partial_lines_across_connections_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    server = mb.tcp_lines(0, max_buffered_bytes=1000, max_line_length=100_000, evict_after=None)
    async with server:
        big = await _connect(server)
        await big.send(b"x" * 800)
        await _until(lambda: server.buffered_bytes == 800)
        small = await _connect(server)
        await small.send(b"y" * 300)  # 1100 > 1000: the largest holder goes
        with anyio.fail_after(SAFETY):
            assert await _closed_by_peer(big)
        await _until(lambda: server.active_connections == 1)
        assert server.buffered_bytes == 300
        await small.send(b"\n")
        with anyio.fail_after(SAFETY):
            assert await server.chunks().__anext__() == ["y" * 300]
        assert server.buffered_bytes == 0
        await small.aclose()
        await big.aclose()
    assert "max_buffered_bytes=1000" in caplog.text and "held the most (800 bytes)" in caplog.text


def test_limit_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        mb.tcp_lines(0, idle_timeout=0)
    with pytest.raises(ValueError, match="evict_after"):
        mb.tcp_lines(0, evict_after=-1)
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        mb.tcp_lines(0, max_buffered_bytes=0)


async def test_with_the_defaults_100_idle_connections_do_not_starve_a_good_client() -> None:
    async with mb.tcp_lines(0) as server:
        idle = [await _connect(server) for _ in range(100)]
        await _until(lambda: server.active_connections == 100)
        async with await _connect(server) as good:
            await good.send(b"served\n")
            with anyio.fail_after(SAFETY):
                assert await server.chunks().__anext__() == ["served"]
        for client in idle:
            await client.aclose()


async def test_stop_intake_delivers_every_line_read_then_ends() -> None:
    """A client sends N lines and waits (does not close); after stop_intake() every one of them
    is delivered, its unfinished last line is not, and the iteration ends by itself."""
    n = 2000
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            lines = server.__aiter__()
            async with await _connect(server) as client, await _connect(server) as idle:
                await client.send(b"".join(f"{i}\n".encode() for i in range(n)) + b"unfinished")
                assert await _take(lines, 1) == ["0"]  # the server reads this client
                server.stop_intake()
                server.stop_intake()  # again: nothing more happens
                rest = [line async for line in lines]
                assert rest == [str(i) for i in range(1, n)]
                # Both connections were closed by the server, the waiting one too.
                assert await _closed_by_peer(client) and await _closed_by_peer(idle)
            assert server.active_connections == 0
        server.stop_intake()  # not running: nothing happens


async def test_stop_intake_accepts_no_new_client() -> None:
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            port = server.port
            server.stop_intake()
            assert [line async for line in server] == []
            async with await anyio.connect_tcp("127.0.0.1", port) as late:
                await late.send(b"too late\n")
                assert server.active_connections == 0
