"""Checkpoints of keyed counts held by shard owners: each owner writes its shard files at a barrier,
the pipeline writes the manifest; resumes (also after kill -9, with other owner or shard counts)
end exact."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

import microbatch as mb
from microbatch.pipeline.owned import OwnedByKey

pytestmark = pytest.mark.anyio


def count_lines(lines: list[str]) -> Counter[str]:
    return Counter(lines)


def make_input(path: Path, n: int, keys: int, seed: int = 11) -> Counter[str]:
    rng = random.Random(seed)
    lines = [f"k{rng.randrange(keys)}" for _ in range(n)]
    path.write_text("".join(f"{line}\n" for line in lines))
    return Counter(lines)


def pipeline(owners: int | None = None, shards: int = 16) -> mb.Pipeline[list[str], object]:
    return mb.Pipeline(
        count_lines, aggregate=mb.ByKey(mb.Count(), shards=shards, owners=owners), max_size=500,
        workers=2, checkpoint_every_batches=3,
    )


async def stop_after(p: mb.Pipeline[list[str], object], src: Path, state: Path, seq: int) -> None:
    async with p.updates(mb.read_lines(src), checkpoint=state) as run:
        assert isinstance(run.agg, OwnedByKey) == (p.aggregate.owners != 0)  # type: ignore[attr-defined]
        async for update in run:
            if update.seq == seq:
                break


async def test_a_resumed_run_ends_exact_and_owners_write_binary_files(tmp_path: Path) -> None:
    expected = make_input(tmp_path / "in.txt", 20_000, 2_000)
    await stop_after(pipeline(), tmp_path / "in.txt", tmp_path / "state", 17)
    names = os.listdir(tmp_path / "state" / "keyed")
    assert names and all(name.endswith(".mbk") for name in names)
    async with pipeline().start(mb.read_lines(tmp_path / "in.txt"), checkpoint=tmp_path / "state") as run:
        assert run.stats.batches > 0  # resumed, not started afresh
        counts = await run.result()
    assert dict(counts) == expected
    # a finished checkpoint gives its value again, loaded in this process
    again = await pipeline().run(mb.read_lines(tmp_path / "in.txt"), checkpoint=tmp_path / "state")
    assert dict(again) == expected


@pytest.mark.parametrize(
    ("first", "second"),
    [((4, 16), (5, 16)), ((2, 16), (2, 8)), ((2, 16), (0, 16)), ((0, 16), (3, 16))],
    ids=["4-to-5-owners", "16-to-8-shards", "owners-to-in-process", "in-process-to-owners"],
)
async def test_resumes_with_other_owner_and_shard_counts(
    tmp_path: Path, first: tuple[int, int], second: tuple[int, int]
) -> None:
    expected = make_input(tmp_path / "in.txt", 15_000, 3_000)
    await stop_after(pipeline(*first), tmp_path / "in.txt", tmp_path / "state", 11)
    counts = await pipeline(*second).run(mb.read_lines(tmp_path / "in.txt"), checkpoint=tmp_path / "state")
    assert dict(counts) == expected


async def test_a_damaged_shard_file_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    expected = make_input(tmp_path / "in.txt", 12_000, 500)
    await stop_after(pipeline(), tmp_path / "in.txt", tmp_path / "state", 14)
    keyed = tmp_path / "state" / "keyed"
    newest = max(keyed.iterdir(), key=lambda f: f.name.split("-")[2])
    data = bytearray(newest.read_bytes())
    data[40] ^= 0xFF
    newest.write_bytes(bytes(data))
    counts = await pipeline().run(mb.read_lines(tmp_path / "in.txt"), checkpoint=tmp_path / "state")
    assert dict(counts) == expected


_RUN = textwrap.dedent(
    """
    import sys, anyio, microbatch as mb
    from collections import Counter

    def count_lines(lines):
        return Counter(lines)

    async def main():
        p = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count()), max_size=200, workers=2,
                        checkpoint_every_batches=2)
        async with p.updates(mb.read_lines(sys.argv[1]), checkpoint=sys.argv[2]) as run:
            async for update in run:
                print(update.seq, flush=True)

    anyio.run(main)
    """
)


def kill_run_at(script: Path, src: Path, state: Path, updates: int) -> None:
    """Start the run in a child process and kill -9 it after ``updates`` updates (or at its end)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(src), str(state)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    try:
        for _ in range(updates):
            if not proc.stdout.readline():
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()


async def test_kill_9_of_the_pipeline_then_resume_is_exact(
    tmp_path: Path, anyio_backend: tuple[str, dict[str, object]]
) -> None:
    # The killed runs are child processes on asyncio; the resume runs on each backend.
    expected = make_input(tmp_path / "in.txt", 30_000, 5_000)
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    rng = random.Random(3)
    for trial in range(2):
        state = tmp_path / f"state-{trial}"
        for _ in range(2):  # killed twice, then resumed to the end
            kill_run_at(script, tmp_path / "in.txt", state, rng.randrange(1, 60))
        # the same computation under another name (the script's __main__.count_lines)
        src = mb.read_lines(tmp_path / "in.txt")
        counts = await pipeline().run(src, checkpoint=state, accept_changes=True)
        assert dict(counts) == expected, f"trial {trial}"


async def test_a_killed_owner_is_started_again_and_the_run_ends_exact(tmp_path: Path) -> None:
    expected = make_input(tmp_path / "in.txt", 30_000, 4_000)
    p = mb.Pipeline(
        count_lines, aggregate=mb.ByKey(mb.Count(), owners=2), max_size=300, workers=2,
        checkpoint_every_batches=7,
    )
    kills = {5: 0, 23: 1, 45: 1, 60: 0}  # batch -> owner killed once that batch's update came
    async with p.updates(mb.read_lines(tmp_path / "in.txt"), checkpoint=tmp_path / "state") as run:
        owners = run.agg.owners  # type: ignore[attr-defined]
        async for update in run:
            owner = kills.get(update.seq)
            if owner is not None:
                os.kill(owners.processes[owner].pid, signal.SIGKILL)
                owners.processes[owner].process.wait()
        counts = run.value
    assert owners.restarts == [2, 2]
    assert dict(counts) == expected


async def test_reads_between_checkpoints_of_every_batch(tmp_path: Path) -> None:
    expected = make_input(tmp_path / "in.txt", 8_000, 300)
    p = mb.Pipeline(
        count_lines, aggregate=mb.ByKey(mb.Count()), max_size=500, workers=2, checkpoint_every_batches=1
    )
    totals = []
    async with p.updates(mb.read_lines(tmp_path / "in.txt"), checkpoint=tmp_path / "state") as run:
        async for update in run:
            totals.append((update.records, sum(update.value.values()), update.value.get("k1")))
    assert all(total >= records for records, total, _ in totals)
    assert totals[-1][:2] == (8_000, 8_000) and totals[-1][2] == expected["k1"]
