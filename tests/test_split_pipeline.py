"""Pipelines over file splits: same values, updates and dead letters as without splits, real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup
from _procs import new_children, workers_stop_starting_after

import microbatch as mb
from microbatch._core.splits import plan_splits

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _test_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MB_TEST_DIR", str(tmp_path))


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def poison(lines: list[str]) -> int:
    if "bad" in lines:
        raise ValueError("cannot parse 'bad'")
    return sum(int(x) for x in lines)


def crash_on_777(lines: list[str]) -> int:
    """Kills its worker whenever it sees the line 777 in a batch of more than one line."""
    if "777" in lines and len(lines) > 1:
        os._exit(9)
    return sum(int(x) for x in lines)


def hang_once(lines: list[str]) -> int:
    """Hangs the first time it sees the line 0."""
    marker = Path(os.environ["MB_TEST_DIR"]) / "hung"
    if "0" in lines and not marker.exists():
        marker.touch()
        threading.Event().wait()
    return sum(int(x) for x in lines)


def write_numbers(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    bad = bad or {}
    path.write_text("".join(f"{bad.get(i, i)}\n" for i in range(n)))
    return path


async def updates_of(pipeline: mb.Pipeline[Any, Any], source: Any, **kw: Any) -> list[mb.Update[Any]]:
    async with pipeline.updates(source, **kw) as run:
        return [update async for update in run]


async def test_splits_fold_every_batch_in_order_with_a_running_batch_number(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 5_000)
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=300, workers=2, split_size=2_000)
    updates = await updates_of(pipeline, mb.read_lines(path))
    assert [u.seq for u in updates] == list(range(len(updates)))
    assert updates[-1].value == sum(range(5_000))
    assert updates[-1].records == 5_000
    assert all(0 < u.batch_records <= 300 for u in updates)
    # Each update is the fold of exactly the records before its position.
    size = path.stat().st_size
    assert updates[-1].position == size
    for u in updates:
        text = path.read_bytes()[: u.position].decode()
        assert u.value == sum(int(x) for x in text.split())
    stats = updates[-1].stats
    assert stats.splits == len(list(plan_splits(0, size, 2_000))) and stats.split_fallbacks == 0
    assert new_children() == []


async def test_without_split_size_or_with_follow_the_file_is_read_here(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 1_000)
    plain = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=100, executor="thread", split_size=None)
    updates = await updates_of(plain, mb.read_lines(path))
    assert updates[-1].value == sum(range(1_000)) and updates[-1].stats.splits == 0
    split = plain.replace(split_size=1_000)
    updates = await updates_of(split, mb.read_lines(path))
    assert updates[-1].value == sum(range(1_000)) and updates[-1].stats.splits == 7  # 3,890 bytes
    # A file no bigger than one split is read here: its batches spread over the workers.
    whole = plain.replace(split_size=path.stat().st_size)
    updates = await updates_of(whole, mb.read_lines(path))
    assert updates[-1].value == sum(range(1_000)) and updates[-1].stats.splits == 0
    with pytest.raises(ValueError, match="split_size"):
        mb.Pipeline(sum_ints, split_size=0)
    with pytest.raises(TypeError, match="split_size"):
        mb.Pipeline(sum_ints, split_size=1.5)  # type: ignore[arg-type]


async def test_a_followed_file_is_not_split(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 100)
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=10, max_wait=0.05, executor="thread")
    with anyio.fail_after(30):
        async with pipeline.updates(mb.read_lines(path, follow=True)) as run:
            async for update in run:
                if update.records == 100:
                    break
    assert update.value == sum(range(100)) and update.stats.splits == 0


def letters(path: Path) -> list[tuple[Any, ...]]:
    return [
        (x["record"], x["position"], x["batch"], x["error"], x["message"])
        for x in map(json.loads, path.read_text().splitlines())
    ]


@pytest.mark.parametrize("split_size", [3_000, 5_000])
async def test_dead_letters_are_the_same_with_and_without_splits(tmp_path: Path, split_size: int) -> None:
    bad = {7: "bad", 450: "bad", 451: "bad", 2_999: "bad"}
    path = write_numbers(tmp_path / "n.txt", 3_000, bad)
    expected = sum(i for i in range(3_000) if i not in bad)
    base = mb.Pipeline(poison, aggregate=mb.Sum(), max_size=100, workers=2, retries=1, backoff=0.0)
    dead = {}
    counts = {}
    for name, size in (("plain", None), ("split", split_size)):
        dead[name] = tmp_path / f"{name}.jsonl"
        pipeline = base.replace(split_size=size, dead_letter=dead[name])
        updates = await updates_of(pipeline, mb.read_lines(path))
        assert updates[-1].value == expected
        assert [u.seq for u in updates] == list(range(len(updates)))
        stats = updates[-1].stats
        counts[name] = (stats.dead_letters, stats.split_fallbacks, stats.crashes)
    # Only the batches that failed in their split's call ran again (no split ran batch by batch).
    assert counts["split"] == counts["plain"] == (4, 0, 0)
    plain, split = letters(dead["plain"]), letters(dead["split"])
    assert [x[0] for x in plain] == ["bad"] * 4
    offsets = [len("".join(f"{bad.get(i, i)}\n" for i in range(n))) for n in sorted(bad)]
    assert [x[1] for x in plain] == offsets
    # Batches are cut from each split's first line: batch numbers may differ, nothing else.
    assert [x[:2] + x[3:] for x in split] == [x[:2] + x[3:] for x in plain]


async def test_a_crash_inside_a_split_isolates_the_record_batch_by_batch(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 2_000)
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(
        crash_on_777, aggregate=mb.Sum(), max_size=100, workers=2, retries=1, backoff=0.0,
        dead_letter=dead, split_size=4_000,
    )
    updates = await updates_of(pipeline, mb.read_lines(path))
    # A batch of one line 777 passes: the record is not dead, and the sum is whole.
    assert updates[-1].value == sum(range(2_000))
    stats = updates[-1].stats
    assert stats.split_fallbacks == 1 and stats.crashes >= 2
    assert [u.seq for u in updates] == list(range(len(updates)))
    assert not dead.exists() or dead.read_text() == ""
    assert new_children() == []


async def test_a_split_that_hangs_times_out_and_runs_batch_by_batch(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 1_000)
    pipeline = mb.Pipeline(
        hang_once, aggregate=mb.Sum(), max_size=100, workers=2, timeout=1.0, split_size=1_000
    )
    with anyio.fail_after(60):
        updates = await updates_of(pipeline, mb.read_lines(path))
    assert updates[-1].value == sum(range(1_000))
    assert updates[-1].stats.timeouts == 1 and updates[-1].stats.split_fallbacks == 1
    assert new_children() == []


async def test_on_error_raise_names_the_batch_as_the_run_counts_them(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 3_000, {2_345: "bad"})
    pipeline = mb.Pipeline(
        poison, aggregate=mb.Sum(), max_size=100, workers=2, retries=0, on_error="raise", split_size=1_000
    )
    seqs: list[int] = []
    with pytest.raises(mb.BatchFailed) as info:
        async with pipeline.updates(mb.read_lines(path)) as run:
            async for update in run:
                seqs.append(update.seq)
    assert info.value.seq == len(seqs)
    assert seqs == list(range(len(seqs)))
    assert isinstance(info.value.cause, ValueError)
    assert new_children() == []


async def test_a_line_too_long_stops_the_run_naming_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "n.txt"
    path.write_text("1\n2\n" + "9" * 500 + "\n3\n")
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), workers=1, split_size=100)
    with pytest.raises(mb.LineTooLong) as info:
        await pipeline.run(mb.read_lines(path, max_line_length=100))
    assert info.value.offset == 4 and str(path) in str(info.value)


async def test_stopped_inside_a_split_then_resumed_gives_the_exact_value(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 3_000)
    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        sum_ints, aggregate=mb.Sum(), max_size=50, executor="inline", split_size=5_000,
        checkpoint_every=None, checkpoint_every_batches=7,
    )
    async with pipeline.updates(mb.read_lines(path), checkpoint=state) as run:
        async for update in run:
            if update.seq == 11:  # inside the second split, not on a checkpoint
                await run.stop()
    # Folding stops at the next batch of the split (one more may be on its way to the consumer).
    assert not run.finished and update.seq in (11, 12, 13)
    assert update.position % 5_000 != 0
    rest = await updates_of(pipeline, mb.read_lines(path), checkpoint=state)
    assert [u.seq for u in rest] == list(range(update.seq + 1, update.seq + 1 + len(rest)))
    assert rest[-1].value == sum(range(3_000))


IO_SCRIPT = """
import os, sys, anyio
import microbatch as mb
sys.path.insert(0, {tests!r})
from _procs import own_io

def sum_ints(lines):
    return sum(int(x) for x in lines)

async def main(path, split_size):
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), workers=2, split_size=split_size)
    read, written = own_io()
    value = await pipeline.run(mb.read_lines(path))
    read_after, written_after = own_io()
    print(value, read_after - read, written_after - written)

anyio.run(main, sys.argv[1], int(sys.argv[2]) or None)
"""


def io_of_a_run(path: Path, script: Path, split_size: int) -> tuple[int, int, int]:
    """Value, bytes read and bytes written by a fresh process that runs the pipeline once."""
    out = subprocess.run(
        [sys.executable, str(script), str(path), str(split_size)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    value, read, written = map(int, out.split())
    return value, read, written


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task/*/io")
def test_the_parent_reads_and_writes_almost_none_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "n.txt"
    with path.open("w") as f:
        for start in range(0, 600_000, 100_000):
            f.write("".join(f"{i}\n" for i in range(start, start + 100_000)))
    size = path.stat().st_size
    assert size > 4_000_000
    script = tmp_path / "io_run.py"
    script.write_text(IO_SCRIPT.format(tests=str(Path(__file__).parent)))
    value, read, written = io_of_a_run(path, script, 1 << 20)
    assert value == sum(range(600_000))
    assert read < 0.05 * size, (read, size)
    assert written < 0.05 * size, (written, size)
    # Without splits the same measure sees the whole file go through the parent.
    value, read, written = io_of_a_run(path, script, 0)
    assert value == sum(range(600_000)) and read > size and written > 0.9 * size


def crash_at_500(lines: list[str]) -> int:
    """Kills its worker on a batch holding the line 500 (once); new workers then fail to start."""
    here = Path(os.environ["MB_TEST_DIR"])
    if "500" in lines and not (here / "crashed").exists():
        (here / "crashed").touch()
        (here / "no-more-workers").touch()
        os._exit(7)
    return sum(int(x) for x in lines)


async def test_workers_that_cannot_start_stop_the_run_after_the_splits_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "no-more-workers"  # crash_at_500 creates it
    workers_stop_starting_after(marker, tmp_path, monkeypatch)
    path = write_numbers(tmp_path / "n.txt", 1_000)
    dead, checkpoint = tmp_path / "dead.jsonl", tmp_path / "ck"
    pipeline = mb.Pipeline(
        crash_at_500, aggregate=mb.Sum(), max_size=100, workers=1, retries=2, backoff=0.0,
        dead_letter=dead, split_size=1_000,
    )
    seen: list[mb.Update[Any]] = []
    with pytest.raises(mb.BatchFailed) as info:
        async with pipeline.updates(mb.read_lines(path), checkpoint=checkpoint) as run:
            async for update in run:
                seen.append(update)
    # The worker died inside the split holding line 500 (bytes 1000-2000): its results were lost
    # with it, and the batch-by-batch rerun of that split could not start a worker.
    assert info.value.seq == len(seen) and seen[-1].position < 1_010
    assert isinstance(info.value.cause, mb.ExecutorUnavailable)
    assert not dead.exists() or dead.read_text() == ""
    assert new_children() == []
    marker.unlink()
    assert await pipeline.run(mb.read_lines(path), checkpoint=checkpoint) == sum(range(1_000))
    assert not dead.exists() or dead.read_text() == ""


def hang_from_line_1500(lines: list[str]) -> int:
    """Hangs on every batch from line 1,500 on."""
    if int(lines[-1]) >= 1_500:
        threading.Event().wait()
    return sum(int(x) for x in lines)


async def test_stop_ends_the_run_without_waiting_for_the_splits_in_flight(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 3_000)
    pipeline = mb.Pipeline(
        hang_from_line_1500, aggregate=mb.Sum(), max_size=10, workers=2, timeout=None, split_size=2_000
    )
    # The splits grow from 250 bytes: the first six (lines 0-1,421) finish, whichever of the first
    # four the workers take first (up to four calls are in flight, in any order); every later one
    # hangs, so only a stop ends the run.
    with anyio.fail_after(60):
        async with pipeline.updates(mb.read_lines(path)) as run:
            async for update in run:
                records = update.records
                await run.stop()
    assert not run.finished
    assert records < 1_500 and run.value == sum(range(records))
    assert new_children() == []


async def test_an_undecodable_line_is_dead_lettered_as_without_splits(tmp_path: Path) -> None:
    path = tmp_path / "n.txt"
    lines = [f"{i}\n".encode() for i in range(2_000)]
    lines[1_500] = b"\xff\xfe\n"
    path.write_bytes(b"".join(lines))
    base = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=100, workers=2, retries=0)
    found = {}
    for name, size in (("plain", None), ("split", 1_500)):
        dead = tmp_path / f"{name}.jsonl"
        pipeline = base.replace(split_size=size, dead_letter=dead)
        updates = await updates_of(pipeline, mb.read_lines(path))
        assert updates[-1].value == sum(range(2_000)) - 1_500
        found[name] = [
            (x["record_base64"], x["position"], x["error"])
            for x in map(json.loads, dead.read_text().splitlines())
        ]
        # The batch failed in its split's call, which counted as its first attempt: no fallback.
        stats = updates[-1].stats
        found[f"{name} stats"] = [(stats.split_fallbacks, stats.errors, stats.retries, stats.dead_letters)]
    offset = len(b"".join(lines[:1_500]))
    assert found["split"] == found["plain"] == [("//4=", offset, "microbatch._exceptions.SourceDecodeError")]
    assert found["split stats"] == found["plain stats"]


@pytest.mark.anyio
async def test_a_stage_sending_to_a_stage_stopped_by_an_error_does_not_hide_the_error() -> None:
    """The fold stage stops with BatchFailed; a dispatcher's send then fails with a broken stream.

    Which of the two a run's task group sees first depends on scheduling; the run raises the
    BatchFailed either way.
    """
    from microbatch.pipeline.run import _unwrap

    failed = mb.BatchFailed(27, ValueError("cannot parse 'bad'"), 1)
    for leaves in ([failed, anyio.BrokenResourceError()], [anyio.ClosedResourceError(), failed]):
        group = BaseExceptionGroup("stages", [BaseExceptionGroup("dispatchers", leaves)])
        assert _unwrap(group) is failed
    alone = anyio.BrokenResourceError()
    assert _unwrap(BaseExceptionGroup("stages", [alone])) is alone
