"""Keyed counts held by shard owner processes: exact, fed by workers directly, gone with the run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import microbatch as mb
from microbatch._core.owners import OwnerRoute
from microbatch.executors.owners import Owners
from microbatch.pipeline.owned import OwnedByKey, OwnedView, owner_count

pytestmark = pytest.mark.anyio


def count_lines(lines: list[str]) -> Counter[str]:
    return Counter(lines)


def typed_keys(lines: list[str]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for line in lines:
        n = int(line[1:])
        key: Any = n if n % 3 == 0 else (("t", n % 7) if n % 3 == 1 else line)
        out[key] = out.get(key, 0) + n
    return out


def make_input(path: Path, n: int, keys: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    lines = [f"k{rng.randrange(keys)}" for _ in range(n)]
    path.write_text("".join(f"{line}\n" for line in lines))
    return lines


async def test_counts_equal_a_counter_over_the_input(tmp_path: Path) -> None:
    lines = make_input(tmp_path / "in.txt", 30_000, 3_000)
    pipeline = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count()), max_size=1_000, workers=2)
    async with pipeline.start(mb.read_lines(tmp_path / "in.txt")) as run:
        assert isinstance(run.agg, OwnedByKey)  # the run uses shard owners
        counts = await run.result()
    assert isinstance(counts, OwnedView)
    assert dict(counts) == Counter(lines)
    assert len(counts) == len(set(lines)) and counts["k1"] == lines.count("k1")
    assert sorted(counts.items()) == sorted(Counter(lines).items())
    assert sum(counts.values()) == len(lines)
    with pytest.raises(KeyError):
        counts["nope"]


async def test_splits_are_whole_batches_unless_max_size_is_given(tmp_path: Path) -> None:
    lines = make_input(tmp_path / "in.txt", 120_000, 2_000)  # about 720 kB
    sizes: dict[bool, list[int]] = {}
    for given in (False, True):
        extra = {"max_size": 10_000} if given else {}
        pipeline = mb.Pipeline(
            count_lines, aggregate=mb.ByKey(mb.Count()), workers=2, split_size=1 << 17, **extra
        )
        async with pipeline.start(mb.read_lines(tmp_path / "in.txt")) as run:
            sizes[given] = [update.batch_records async for update in run.updates()]
            counts = await run.result()
        assert dict(counts) == Counter(lines)
    assert max(sizes[True]) == 10_000
    # splits of 128 KiB hold about 21,800 lines each; the first ones are smaller (1/8, 1/4, 1/2)
    assert max(sizes[False]) > 15_000 and len(sizes[False]) < len(sizes[True])


async def test_records_from_an_iterable_and_three_owners(tmp_path: Path) -> None:
    lines = [f"k{(i * 7919) % 500}" for i in range(12_000)]
    counts = await mb.Pipeline(
        count_lines, aggregate=mb.ByKey(mb.Count(), shards=8, owners=3), max_size=700, workers=2
    ).run(lines)
    assert dict(counts) == Counter(lines)


async def test_sums_with_int_str_and_tuple_keys(tmp_path: Path) -> None:
    lines = make_input(tmp_path / "in.txt", 20_000, 2_000)
    sums = await mb.Pipeline(
        typed_keys, aggregate=mb.ByKey(mb.Sum(), owners=2), max_size=1_500, workers=2
    ).run(mb.read_lines(tmp_path / "in.txt"))
    assert dict(sums) == typed_keys(lines)


async def test_updates_are_small_and_reads_ask_the_owners(tmp_path: Path) -> None:
    lines = make_input(tmp_path / "in.txt", 10_000, 100)
    pipeline = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count()), max_size=1_000, workers=2)
    seen = []
    async with pipeline.updates(mb.read_lines(tmp_path / "in.txt")) as updates:
        async for update in updates:
            assert isinstance(update.value, OwnedView)
            seen.append((update.records, sum(update.value.values()), len(update.value)))
    # a live view, as ByKey's own: a read sees at least the batches folded before its update
    assert all(total >= records for records, total, _ in seen)
    assert [total for _, total, _ in seen] == sorted(total for _, total, _ in seen)
    assert seen[-1][0] == 10_000 and seen[-1][2] == len(set(lines))


async def test_a_run_checkpointed_to_a_store_object_folds_in_the_pipeline_process(tmp_path: Path) -> None:
    lines = make_input(tmp_path / "in.txt", 5_000, 300)
    pipeline = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count()), max_size=1_000, workers=2)
    store = mb.DirectoryStore(tmp_path / "state")
    async with pipeline.start(mb.read_lines(tmp_path / "in.txt"), checkpoint=store) as run:
        assert not isinstance(run.agg, OwnedByKey)  # no folder for shard files: the owners' is a folder
        assert dict(await run.result()) == Counter(lines)


def test_which_runs_get_owners() -> None:
    assert owner_count(mb.ByKey(mb.Count()), 2) == 2
    assert owner_count(mb.ByKey(mb.Count(), shards=1), 2) == 1
    assert owner_count(mb.ByKey(mb.Count(), owners=0), 2) == 0
    assert owner_count(mb.ByKey(mb.Sum()), 2) == 0
    assert owner_count(mb.ByKey(mb.Sum(), owners=3), 2) == 3
    assert owner_count(mb.ByKey(mb.Mean(), owners=3), 2) == 0
    assert owner_count(mb.Sum(), 2) == 0
    with pytest.raises(ValueError, match="owners"):
        mb.ByKey(mb.Count(), shards=4, owners=5)


async def test_a_bad_partial_is_refused_in_the_worker_naming_the_key() -> None:
    async with Owners(2, 4, keep_parts=False) as owners:
        route = OwnerRoute(lambda lines: {"a": 1, "b": -2}, 4, owners.folder, 2, counts=True)
        with pytest.raises(TypeError, match="'b' has -2"):
            route([])
        route = OwnerRoute(lambda lines: {"a": 1.5}, 4, owners.folder, 2, counts=False)
        with pytest.raises(TypeError, match=r"'a' has 1\.5"):
            route([])
        route = OwnerRoute(lambda lines: [1], 4, owners.folder, 2, counts=False)
        with pytest.raises(TypeError, match="mapping"):
            route([])


async def test_a_part_never_named_is_never_folded() -> None:
    async with Owners(2, 4, keep_parts=False) as owners:
        route = OwnerRoute(count_lines, 4, owners.folder, 2, counts=True)
        route(["a", "b", "c"])  # an attempt whose result never reached the fold stage
        owners.fold(route(["a", "a"]))
        assert {k: v for shard in owners.take_state().values() for k, v in shard.items()} == {"a": 2}
    assert owners.final is not None


_KILLED_RUN = textwrap.dedent(
    """
    import sys, anyio, microbatch as mb
    from collections import Counter

    def slow_count(lines):
        import time
        time.sleep(0.05)
        return Counter(lines)

    async def main():
        pipeline = mb.Pipeline(slow_count, aggregate=mb.ByKey(mb.Count()), max_size=10, workers=2)
        async with pipeline.updates([f"k{i}" for i in range(1_000_000)]) as updates:
            async for update in updates:
                print(update.seq, flush=True)

    anyio.run(main)
    """
)


def test_owners_die_with_a_killed_pipeline(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for _ in range(5):
            proc.stdout.readline()  # batches are being folded: owners run
        owners = [
            p for p in psutil.Process(proc.pid).children()
            if any("ownerproc.py" in part for part in p.cmdline())
        ]
        assert len(owners) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(owners, timeout=10)
        assert not alive, f"shard owners outlived the pipeline: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_killed_owner_fails_a_run_without_checkpoint_with_a_clear_error(tmp_path: Path) -> None:
    lines = [f"k{i % 50}" for i in range(200_000)]
    pipeline = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count()), max_size=100, workers=2)
    # Without a checkpoint there is nothing to start it again from: the next FOLD to it fails.
    with pytest.raises(mb.WorkerCrashed, match="shard owner 0"):
        async with pipeline.updates(lines) as updates:
            async for update in updates:
                if update.seq == 3:
                    agg = updates.agg
                    assert isinstance(agg, OwnedByKey)
                    os.kill(agg.owners.processes[0].pid, signal.SIGKILL)
                    agg.owners.processes[0].process.wait()


def test_keyed_views_iterate_values_and_items_shard_by_shard() -> None:
    agg = mb.ByKey(mb.Mean(), shards=4)
    state = agg.fold(agg.initial(), {"a": 1.0, "b": 3.0, ("t", 1): 2.0})
    view = agg.value(state)
    assert dict(view.items()) == {"a": 1.0, "b": 3.0, ("t", 1): 2.0}
    assert sorted(view.values()) == [1.0, 2.0, 3.0]
    assert ("a", 1.0) in view.items() and 3.0 in view.values()


async def test_a_pipeline_with_a_sink_gets_fn_results_and_no_owners(tmp_path: Path) -> None:
    lines = make_input(tmp_path / "in.txt", 3_000, 50)
    got: list[Any] = []

    async def sink(seq: int, result: Any) -> None:
        got.append(result)

    pipeline = mb.Pipeline(
        count_lines, aggregate=mb.ByKey(mb.Count()), max_size=1_000, workers=2, sink=sink
    )
    async with pipeline.start(mb.read_lines(tmp_path / "in.txt")) as run:
        assert not isinstance(run.agg, OwnedByKey)
        counts = await run.result()
    assert dict(counts) == Counter(lines) == sum(got, Counter())


def test_folders_of_killed_pipelines_are_removed(tmp_path: Path) -> None:
    from microbatch.executors.owners import remove_stale_folders

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"microbatch-owners-{gone.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    mine = tmp_path / f"microbatch-owners-{os.getpid()}-def"
    mine.mkdir()
    other = tmp_path / "microbatch-owners-notapid"
    other.mkdir()
    assert remove_stale_folders(str(tmp_path)) == [stale.name]
    assert not stale.exists() and mine.exists() and other.exists()


async def test_updates_do_not_wait_for_an_owner_to_fold(tmp_path: Path) -> None:
    """The fold stage tells an owner what to fold and goes on: an owner that folds slowly (here:
    stopped) delays no update; its FOLDs wait in its connection, in order."""
    lines = make_input(tmp_path / "in.txt", 40_000, 500)
    pipeline = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count()), max_size=500, workers=2)
    after = 0
    async with pipeline.updates(mb.read_lines(tmp_path / "in.txt")) as run:
        stopped = run.agg.owners.processes[0].pid  # type: ignore[attr-defined]
        try:
            with anyio.fail_after(60):  # were updates to wait for the owner, none would come
                async for update in run:
                    if update.seq == 2:
                        os.kill(stopped, signal.SIGSTOP)
                    elif update.seq > 2:
                        after += 1
                        if after == 60:
                            os.kill(stopped, signal.SIGCONT)
        finally:
            os.kill(stopped, signal.SIGCONT)
        counts = run.value
    assert after == 80 - 3 and dict(counts) == Counter(lines)
