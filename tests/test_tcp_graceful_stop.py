"""A pipeline over a TCP server stopped gracefully (``Run.stop()``, what SIGTERM does on the command
line): every line the server had received is batched and folded before the final checkpoint.

A real server on 127.0.0.1 and a real client that sends N lines and then waits, without closing.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import microbatch as mb
from microbatch.checkpoints.targets import open_store

pytestmark = pytest.mark.anyio

SAFETY = 30  # seconds; a net for a stuck test, never what decides an outcome


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


async def test_stop_folds_every_line_the_server_received(tmp_path: Path) -> None:
    n, state = 5000, tmp_path / "state"
    # Batches never fill up and never time out: without a graceful stop, every line would be lost.
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=100_000, max_wait=None, executor="thread")
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            async with await anyio.connect_tcp("127.0.0.1", server.port) as client:
                await client.send(b"".join(f"{i}\n".encode() for i in range(n)))
                async with pipeline.updates(server, checkpoint=state) as run:
                    await run.stop()
                    updates = [update async for update in run]
                assert run.value == sum(range(n))
                assert sum(u.batch_records for u in updates) == n
    store = open_store(state)
    try:
        cp = store.load()
    finally:
        store.close()
    assert cp is not None and cp.records == n and not cp.finished
