"""Exactly-once resume: kill -9 at random moments, corrupt state, mismatches, follow mode."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from _procs import alive as is_alive

import microbatch as mb

HERE = Path(__file__).parent
KILLS = int(os.environ.get("MB_KILLS", "10"))
POISON = {1234: "bad", 7777: "bad"}


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def count_lines(lines: list[str]) -> int:
    return len(lines)


def numbers_file(path: Path, n: int) -> int:
    path.write_text("".join(f"{POISON.get(i, i)}\n" for i in range(n)))
    return sum(i for i in range(n) if i not in POISON)


def start_job(numbers: Path, state: Path, dead: Path, mode: str = "sum") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "resume_job.py"), str(numbers), str(state), str(dead), mode],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_gone(pids: list[int], within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if is_alive(p)]
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize("mode", ["sum", "keyed", "source"])
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_value(
    tmp_path: Path, mode: str
) -> None:
    numbers, state, dead = tmp_path / "n.txt", tmp_path / "state", tmp_path / "dead.jsonl"
    expected: Any = numbers_file(numbers, 20_000)  # 100 batches of 200
    if mode == "keyed":
        totals: dict[int, int] = {}
        for i in range(20_000):
            if i not in POISON:
                totals[i % 97] = totals.get(i % 97, 0) + i
        expected = f"{sum(k * v for k, v in totals.items())} {len(totals)}"
    rng = random.Random(int(os.environ.get("MB_SEED", "0")) or None)
    kills = 0
    for _ in range(KILLS):
        proc = start_job(numbers, state, dead, mode)
        assert proc.stdout is not None
        wait_for = rng.randint(1, 12)
        seen = 0
        finished = False
        for line in proc.stdout:
            if line.startswith("done"):
                finished = True
                break
            seen += 1
            if seen >= wait_for:
                break
        workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        if not finished:
            time.sleep(rng.random() * 0.02)  # lands anywhere: mid-batch, mid-checkpoint, mid-write
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert wait_gone(workers) == [], "workers outlived their killed parent"
        if finished:
            break
    assert kills >= min(KILLS, 3)
    proc = start_job(numbers, state, dead, mode)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    last = out.strip().splitlines()[-1]
    assert last == f"done {expected}"
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert sorted(letter["record"] for letter in letters) == ["bad", "bad"]


@pytest.mark.anyio
async def test_finished_run_returns_its_value_without_reading(tmp_path: Path) -> None:
    numbers = tmp_path / "n.txt"
    numbers.write_text("".join(f"{i}\n" for i in range(1000)))
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=100, executor="thread")
    state = tmp_path / "state"
    assert await pipeline.run(mb.read_lines(numbers), checkpoint=state) == sum(range(1000))
    numbers.unlink()  # a second run must not need the source at all
    assert await pipeline.run(mb.read_lines(numbers), checkpoint=state) == sum(range(1000))


@pytest.mark.anyio
async def test_fingerprint_mismatch_is_refused_and_fresh_starts_over(tmp_path: Path) -> None:
    numbers = tmp_path / "n.txt"
    numbers.write_text("".join(f"{i}\n" for i in range(100)))
    state = tmp_path / "state"
    await mb.Pipeline(sum_ints, aggregate=mb.Sum(), executor="thread").run(
        mb.read_lines(numbers), checkpoint=state
    )
    other = mb.Pipeline(count_lines, aggregate=mb.Sum(), executor="thread")
    with pytest.raises(mb.CheckpointMismatch, match="fn") as info:
        await other.run(mb.read_lines(numbers), checkpoint=state)
    assert "fresh" in str(info.value)
    assert await other.run(mb.read_lines(numbers), checkpoint=state, fresh=True) == 100


@pytest.mark.anyio
async def test_interrupted_iterable_run_resumes_by_skipping_counted_records(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    pipeline = mb.Pipeline(
        sum, aggregate=mb.Sum(), max_size=10, executor="inline", checkpoint_every_batches=1
    )
    async with pipeline.updates(range(1000), checkpoint=state) as updates:
        async for update in updates:
            if update.seq == 4:
                break
    assert await pipeline.run(range(1000), checkpoint=state) == sum(range(1000))


@pytest.mark.anyio
async def test_dead_letters_are_not_duplicated_after_resume(tmp_path: Path) -> None:
    def fussy(xs: list[int]) -> int:
        if any(x % 100 == 42 for x in xs):
            raise ValueError("42")
        return sum(xs)

    state, dead = tmp_path / "state", tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(
        fussy,
        aggregate=mb.Sum(),
        max_size=50,
        executor="inline",
        retries=0,
        dead_letter=dead,
        checkpoint_every=None,
        checkpoint_every_batches=3,
    )
    async with pipeline.updates(range(1000), checkpoint=state) as updates:
        async for update in updates:
            if update.seq == 7:  # 8 batches folded, the checkpoint covers 6: two are redone
                break
    total = await pipeline.run(range(1000), checkpoint=state)
    assert total == sum(x for x in range(1000) if x % 100 != 42)
    letters = [json.loads(line)["record"] for line in dead.read_text().splitlines()]
    assert letters == [x for x in range(1000) if x % 100 == 42]


@pytest.mark.anyio
async def test_follow_mode_resumes_at_the_saved_byte_offset(tmp_path: Path) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    log.write_text("".join(f"{i}\n" for i in range(100)))
    pipeline = mb.Pipeline(
        sum_ints,
        aggregate=mb.Sum(),
        max_size=25,
        max_wait=0.05,
        executor="thread",
        checkpoint_every_batches=1,
    )

    async def run_until(records: int) -> Any:
        async with pipeline.updates(mb.read_lines(log, follow=True), checkpoint=state) as updates:
            async for update in updates:
                if update.records >= records:
                    break
        return updates.value

    with anyio.fail_after(30):
        assert await run_until(100) == sum(range(100))
        with log.open("a") as f:
            f.write("".join(f"{i}\n" for i in range(100, 150)))
        assert await run_until(150) == sum(range(150))


@pytest.mark.anyio
async def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        sum, aggregate=mb.Sum(), max_size=10, executor="inline", checkpoint_every_batches=1
    )
    async with pipeline.updates(range(100), checkpoint=state) as updates:
        async for update in updates:
            if update.seq == 4:
                break
    newest = sorted(p for p in state.iterdir() if p.name.startswith("checkpoint"))[-1]
    newest.write_bytes(newest.read_bytes()[:20])  # truncated by a crash of the disk
    assert await pipeline.run(range(100), checkpoint=state) == sum(range(100))


@pytest.mark.anyio
async def test_a_second_run_on_the_same_checkpoint_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pipeline = mb.Pipeline(sum, aggregate=mb.Sum(), max_size=10, executor="inline")
    async with pipeline.updates(range(100), checkpoint=state) as updates:
        async for _ in updates:
            with pytest.raises(mb.CheckpointError, match="in use by another run"):
                await pipeline.run(range(100), checkpoint=state)
            break
    # The first run ended (its lock went with it): the store is free again.
    assert await pipeline.run(range(100), checkpoint=state) == sum(range(100))


@pytest.mark.anyio
async def test_dead_letters_of_a_sqlite_checkpoint_go_beside_it_whatever_the_suffix_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def fussy(xs: list[int]) -> int:
        if 7 in xs:
            raise ValueError("7")
        return sum(xs)

    pipeline = mb.Pipeline(fussy, aggregate=mb.Sum(), max_size=5, executor="inline", retries=0)
    assert await pipeline.run(range(20), checkpoint=tmp_path / "STATE.DB") == sum(range(20)) - 7
    assert (tmp_path / "STATE.DB").is_file()
    assert json.loads((tmp_path / "STATE.DB.dead-letters.jsonl").read_text())["record"] == 7
    assert not (tmp_path / "dead-letters.jsonl").exists()
