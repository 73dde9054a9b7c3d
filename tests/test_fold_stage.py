"""The fold stage in a real pipeline: what it saves, when, and what it never builds."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from _procs import newest_checkpoint, wait_for
from trio.testing import MockClock

import microbatch as mb
from microbatch.checkpoints.directory import DirectoryStore
from microbatch.checkpoints.format import Checkpoint

pytestmark = pytest.mark.anyio


class CountingSum(mb.Sum):
    """A Sum that counts how often a checkpoint of its state is built."""

    def __init__(self) -> None:
        self.dumps = 0

    def dump(self, state: Any) -> Any:
        self.dumps += 1
        return super().dump(state)


def total(records: list[int]) -> int:
    return sum(records)


async def test_without_a_checkpoint_no_state_is_ever_dumped() -> None:
    # checkpoint_every=0 makes a checkpoint due after every batch: without a store, none is
    # written, and none may be built either (a keyed state's dump costs as much as the state).
    agg = CountingSum()
    pipeline = mb.Pipeline(total, aggregate=agg, max_size=10, executor="inline", checkpoint_every=0)
    assert await pipeline.run(range(1_000)) == sum(range(1_000))
    assert agg.dumps == 0


# -- checkpoints on the clock -----------------------------------------------------------------------


class RecordingStore:
    """A checkpoint store in memory that notes the event loop's time of every save."""

    location = "<memory>"

    def __init__(self, watch: Callable[[Checkpoint], bool] = lambda cp: False) -> None:
        self.skipped: list[tuple[str, str]] = []
        self.saves: list[tuple[float, Checkpoint]] = []
        self.watch = watch
        self.seen = anyio.Event()

    def lock(self) -> None:
        pass  # held in memory: nobody else can write it

    def load(self, validate: Callable[[Checkpoint], object] | None = None) -> Checkpoint | None:
        if self.saves and validate is not None:
            validate(self.saves[-1][1])
        return self.saves[-1][1] if self.saves else None

    def save(self, checkpoint: Checkpoint) -> None:  # called in a worker thread
        self.saves.append((anyio.from_thread.run_sync(anyio.current_time), checkpoint))
        if self.watch(checkpoint):
            anyio.from_thread.run_sync(self.seen.set)

    def clear(self) -> None:
        self.saves.clear()

    def close(self) -> None:
        pass


def quiet_after(records: int) -> Callable[[], AsyncIterator[int]]:
    """A source of ``records`` numbers that then goes quiet (a TCP client that stopped sending)."""

    async def source() -> AsyncIterator[int]:
        for i in range(records):
            yield i
        await anyio.Event().wait()

    return source


@pytest.mark.parametrize("consume", [True, False], ids=["consumed", "consumer-waits"])
async def test_a_quiet_source_is_checkpointed_on_the_clock(consume: bool) -> None:
    # Consumed, both batches are folded; else the first one waits to be taken, and is covered.
    folded = 10 if consume else 5
    store = RecordingStore(lambda cp: cp.records == folded)
    pipeline = mb.Pipeline(total, aggregate=mb.Sum(), max_size=5, executor="inline", checkpoint_every=0.2)
    with anyio.fail_after(30):
        async with pipeline.updates(quiet_after(10)(), checkpoint=store) as run:
            if consume:
                assert [u.records async for u in _take(run, 2)] == [5, 10]
            # Nothing more comes: the checkpoint of what was folded is due on the clock alone.
            await store.seen.wait()
    first = store.saves[0][1]
    assert (first.batches, first.records, first.position) == (0, 0, None)  # the start checkpoint
    assert store.saves[-1][1].records == folded and store.saves[-1][1].position == folded


async def test_a_quiet_tcp_client_is_checkpointed_on_the_clock() -> None:
    # A real server and a real client that sends 300 lines, then stays connected and silent.
    store = RecordingStore(lambda cp: cp.records == 300)
    pipeline = mb.Pipeline(
        sum_lines, aggregate=mb.Sum(), max_size=100, max_wait=0.05, executor="thread", checkpoint_every=0.2
    )
    with anyio.fail_after(30):
        async with mb.tcp_lines(0) as server:
            async with await anyio.connect_tcp("127.0.0.1", server.port) as client:
                await client.send(b"".join(f"{i}\n".encode() for i in range(300)))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(functools.partial(pipeline.run, server, checkpoint=store))
                    await store.seen.wait()
                    tg.cancel_scope.cancel()
    assert max(cp.records for _, cp in store.saves) == 300


async def test_a_checkpoint_covers_what_was_folded_while_one_batch_is_slow() -> None:
    # Batch 2 hangs in its worker thread; 0 and 1 were folded, 3 and 4 wait behind 2 in order.
    release = threading.Event()
    store = RecordingStore(lambda cp: cp.batches == 2)
    pipeline = mb.Pipeline(
        functools.partial(slow_at, 10, release), aggregate=mb.Sum(), max_size=5, executor="thread",
        workers=2, checkpoint_every=0.2,
    )
    values: list[int] = []

    async def run() -> None:
        values.append(await pipeline.run(range(25), checkpoint=store))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                await store.seen.wait()
            finally:
                release.set()
    assert values == [sum(range(25))]
    assert store.saves[-1][1].finished and store.saves[-1][1].records == 25


def slow_at(first: int, release: threading.Event, records: list[int]) -> int:
    if records[0] == first:
        release.wait(30)
    return sum(records)


async def _take(run: AsyncIterator[Any], n: int) -> AsyncIterator[Any]:
    for _ in range(n):
        yield await run.__anext__()


def test_on_a_mock_clock_the_checkpoint_comes_at_most_every_plus_one_second_later() -> None:
    async def main() -> None:
        store = RecordingStore(lambda cp: cp.records == 10)
        pipeline = mb.Pipeline(total, aggregate=mb.Sum(), max_size=5, executor="inline", checkpoint_every=5)
        async with pipeline.updates(quiet_after(10)(), checkpoint=store) as run:
            updates = [u async for u in _take(run, 2)]
            await store.seen.wait()
        folded_at = updates[-1].stats.elapsed + updates[-1].stats.started
        saved_at = next(t for t, cp in store.saves if cp.records == 10)
        previous = max(t for t, cp in store.saves if cp.records < 10)
        assert saved_at <= max(folded_at, previous + 5) + 1
        assert saved_at >= previous + 5  # and not sooner than every seconds after the previous one

    anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


# -- cancellation -----------------------------------------------------------------------------------


def sum_lines(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


async def test_a_consumer_cancelled_mid_run_leaves_a_checkpoint_of_every_folded_batch(tmp_path: Path) -> None:
    # A plain iterable, real worker processes, no periodic checkpoint before the cancellation.
    state = tmp_path / "state"
    pipeline = mb.Pipeline(total, aggregate=mb.Sum(), max_size=100, workers=2, checkpoint_every=None)
    with anyio.CancelScope() as scope:
        async with pipeline.updates(range(10_000), checkpoint=state) as run:
            async for update in run:
                if update.seq == 3:
                    scope.cancel()  # the consumer's own task is cancelled, mid-iteration
    folded = run.stats.batches
    assert 4 <= folded < 100
    saved = DirectoryStore(state).load()
    assert saved is not None and saved.batches == folded and saved.records == 100 * folded
    assert not saved.finished
    resumed = mb.Pipeline(total, aggregate=mb.Sum(), max_size=100, workers=2)
    assert await resumed.run(range(10_000), checkpoint=state) == sum(range(10_000))


async def test_leaving_updates_early_over_a_split_file_leaves_a_checkpoint(tmp_path: Path) -> None:
    src, state = tmp_path / "n.txt", tmp_path / "state"
    src.write_text("".join(f"{i}\n" for i in range(20_000)))
    pipeline = mb.Pipeline(
        sum_lines, aggregate=mb.Sum(), max_size=500, workers=2, split_size=16_384, checkpoint_every=None
    )
    async with pipeline.updates(mb.read_lines(src), checkpoint=state) as run:
        async for update in run:
            assert update.stats.splits >= 1  # read as splits, not by the parent
            break
    folded = run.stats.batches
    saved = DirectoryStore(state).load()
    assert saved is not None and saved.batches == folded >= 1 and saved.records == run.stats.records
    assert isinstance(saved.position, int) and saved.position > 0
    assert await pipeline.run(mb.read_lines(src), checkpoint=state) == sum(range(20_000))


# -- kill -9 ----------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]

JOB = '''
import microbatch as mb


def total(lines):
    return sum(int(x) for x in lines)


pipeline = mb.Pipeline(total, aggregate=mb.Sum(), max_size=100, max_wait=0.05, workers=1)
'''


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_kill_9_of_a_quiet_follow_run_after_the_checkpoint_deadline_resumes_exact(tmp_path: Path) -> None:
    job, log, state = tmp_path / "job.py", tmp_path / "app.log", tmp_path / "state"
    job.write_text(JOB)
    log.write_text("".join(f"{i}\n" for i in range(1_000)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "microbatch", "run", f"{job}:pipeline", "--input", str(log),
               "--checkpoint", str(state), "--json", "--no-progress"]
    proc = subprocess.Popen([*command, "--follow", "--checkpoint-every", "1"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_reset_signals)
    try:
        # The file is read and folded, then stays quiet: no batch is folded after that, and the
        # checkpoint covering all of it still comes, on the clock.
        def all_checkpointed() -> bool:
            newest = newest_checkpoint(state)
            return newest is not None and newest[1]["records"] == 1_000

        wait_for(all_checkpointed, "a checkpoint of every line", 60)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    with log.open("a") as f:
        f.writelines(f"{i}\n" for i in range(1_000, 2_000))
    done = subprocess.run(command, env=env, text=True, capture_output=True, timeout=120,
                          preexec_fn=_reset_signals)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == sum(range(2_000))
    assert "resuming from" in done.stderr and "1000 records folded" in done.stderr


def test_a_follow_run_killed_before_its_first_regular_checkpoint_resumes_in_the_file_it_started_in(
    tmp_path: Path,
) -> None:
    # The start checkpoint names the file reading began in (by identity, not by path). The file
    # is rotated, the run killed with no other checkpoint written: the resumed run finishes the
    # rotated file, then reads the new one.
    job, log, state = tmp_path / "job.py", tmp_path / "app.log", tmp_path / "state"
    job.write_text(JOB)
    log.write_text("".join(f"{i}\n" for i in range(1_000)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "microbatch", "run", f"{job}:pipeline", "--input", str(log), "--follow",
               "--checkpoint", str(state), "--json", "--no-progress"]
    proc = subprocess.Popen([*command, "--checkpoint-every", "3600"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_reset_signals)
    try:
        wait_for(lambda: newest_checkpoint(state) is not None, "the start checkpoint", 60)
        log.rename(tmp_path / "app.log.1")
        log.write_text("".join(f"{i}\n" for i in range(1_000, 1_500)))
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    newest = newest_checkpoint(state)
    assert newest is not None and newest[1]["batches"] == 0 and newest[1]["identity"] is not None

    resumed = subprocess.Popen([*command, "--checkpoint-every", "0"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_reset_signals)
    try:
        def all_folded() -> bool:
            newest = newest_checkpoint(state)
            return newest is not None and newest[1]["records"] >= 1_500

        wait_for(all_folded, "every line folded", 60)
        resumed.send_signal(signal.SIGTERM)
        stdout, stderr = resumed.communicate(timeout=30)
    finally:
        resumed.kill()
    assert json.loads(stdout.splitlines()[-1]) == sum(range(1_500)), stderr
    assert newest_checkpoint(state)[1]["records"] == 1_500  # type: ignore[index]


# -- an aggregator whose fold raises ----------------------------------------------------------------


def numbers_or_poison(lines: list[str]) -> list[Any]:
    """Each record as a number, a poison word as itself; a record "crash" fails the batch (so it
    is bisected and arrives as several results)."""
    if "crash" in lines:
        raise ValueError("a crash record")
    return [line if line == "poison" else int(line) for line in lines]


class ListSum(mb.Aggregator[list[Any], int, int]):
    """Sums lists of numbers one at a time, refusing "poison" midway (a partly folded state) while
    ``refuse`` holds, and counting it as 0 otherwise."""

    refuse = True

    def initial(self) -> int:
        return 0

    def fold(self, state: int, result: list[Any]) -> int:
        for item in result:
            if item != "poison":
                state += item
            elif self.refuse:
                raise ValueError("poison cannot be folded")
        return state

    def value(self, state: int) -> int:
        return state

    def dump(self, state: int) -> int:
        return state

    def load(self, data: Any) -> int:
        return int(data)


async def test_a_fold_that_raises_leaves_the_last_checkpoint_standing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second batch is bisected around "crash": its first half [5] folds, its second half
    # [6, poison] raises. Without care, the final checkpoint would save 1+2+3+4+5 at the position
    # after the first batch, and a resumed run would fold 5 twice.
    source = tmp_path / "in.txt"
    source.write_text("1\n2\n3\n4\n5\ncrash\n6\npoison\n9\n10\n")
    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        numbers_or_poison, aggregate=ListSum(), max_size=4, workers=1, retries=0,
        backoff=0.0, on_error="dead_letter", checkpoint_every_batches=1,
    )
    with pytest.raises(ValueError, match="poison"):
        await pipeline.run(mb.read_lines(source), checkpoint=state)
    newest = newest_checkpoint(state)
    assert newest is not None
    body = newest[1]
    # Every checkpoint left pairs a state with the batches it covers: 1+2+3+4 after one batch.
    assert (body["batches"], body["state"]) in {(0, 0), (1, 10)}
    # Once poison is accepted, the resumed run ends where an uninterrupted one does: 5 once.
    monkeypatch.setattr(ListSum, "refuse", False)
    # The fixed aggregator is accepted as the same computation (its code changed).
    assert await pipeline.run(mb.read_lines(source), checkpoint=state, accept_changes=True) == 40
