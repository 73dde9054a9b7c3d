"""Map-style pipelines (no aggregate) and the pipeline's log messages, on every backend."""

from __future__ import annotations

import logging
import re
import time
import weakref
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import microbatch as mb

pytestmark = pytest.mark.anyio


def doubled(lines: list[str]) -> list[int]:
    return [2 * int(x) for x in lines]


def doubled_or_fail(lines: list[str]) -> list[int]:
    if "bad" in lines:
        raise ValueError("cannot parse 'bad'")
    return [2 * int(x) for x in lines]


def numbers(path: Path, n: int, bad_at: int | None = None) -> Path:
    path.write_text("".join(("bad" if i == bad_at else str(i)) + "\n" for i in range(n)))
    return path


async def test_map_yields_results_in_batch_order_with_worker_processes(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 5_000)
    pipeline = mb.Pipeline(doubled, max_size=100, workers=2)
    out: list[int] = []
    async with pipeline.map(mb.read_lines(src)) as results:
        async for result in results:
            out += result
    assert out == [2 * i for i in range(5_000)]
    assert await pipeline.run(mb.read_lines(src)) is None  # no aggregate: no value


async def test_a_split_batch_yields_its_parts_results_in_order(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 40, bad_at=17)
    pipeline = mb.Pipeline(
        doubled_or_fail, max_size=40, executor="inline", retries=0, dead_letter=tmp_path / "dl.jsonl"
    )
    parts: list[list[int]] = []
    async with pipeline.updates(mb.read_lines(src)) as updates:
        async for update in updates:
            assert update.split and update.result is None
            parts = update.results
    assert [x for part in parts for x in part] == [2 * i for i in range(40) if i != 17]
    assert len(parts) > 1


async def test_update_result_is_the_result_of_a_batch_that_ran_whole(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 30)
    pipeline = mb.Pipeline(doubled, aggregate=mb.Count(), max_size=10, executor="inline")
    async with pipeline.updates(mb.read_lines(src)) as updates:
        got = [(u.seq, u.result) for u in [u async for u in updates]]
    assert got == [(s, [2 * i for i in range(10 * s, 10 * s + 10)]) for s in range(3)]


class Held:
    """A result whose life the test watches (weak references)."""

    def __init__(self, batch: list[int]) -> None:
        self.batch = batch


class GatedAfterFirst:
    """fn: batches after the first wait in the worker until the file ``gate`` exists."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate

    def __call__(self, batch: list[int]) -> Held:
        deadline = time.monotonic() + 30  # a net for a stuck test
        while batch[0] and not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        return Held(batch)


async def test_a_result_given_out_is_not_kept_while_the_next_one_is_awaited(tmp_path: Path) -> None:
    """Results can be large: once the consumer dropped one, nothing keeps it while the pipeline
    waits for the next (which the worker holds back until the test has looked)."""
    gate = tmp_path / "gate"
    pipeline = mb.Pipeline(GatedAfterFirst(gate), max_size=1, workers=1, on_error="raise")
    async with pipeline.map(range(2)) as results:
        first = await results.__anext__()
        earlier = weakref.ref(first)
        del first
        second: list[Held] = []
        async with anyio.create_task_group() as tg:

            async def take() -> None:
                second.append(await results.__anext__())

            tg.start_soon(take)
            # Let every stage that can run go on: they can only wait for the worker's answer.
            for _ in range(1000):
                if earlier() is None:
                    break
                await anyio.lowlevel.checkpoint()
            assert earlier() is None
            gate.touch()
    assert [held.batch for held in second] == [[1]]


async def test_map_resumes_from_the_checkpoint_after_cancellation(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 2_000)
    state = tmp_path / "state"
    pipeline = mb.Pipeline(doubled, max_size=100, workers=2, checkpoint_every_batches=1)
    first: list[list[int]] = []
    async with pipeline.map(mb.read_lines(src), checkpoint=state) as results:
        async for result in results:
            first.append(result)
            if len(first) == 5:
                break  # leaving the block cancels the run and writes a final checkpoint
    rest: list[list[int]] = []
    async with pipeline.map(mb.read_lines(src), checkpoint=state) as results:
        async for result in results:
            rest.append(result)
    # Delivery is at least once: the second run starts at the last checkpoint, at or before the 6th.
    assert len(first) == 5 and 15 <= len(rest) <= 20
    merged = first[: 20 - len(rest)] + rest
    assert [x for r in merged for x in r] == [2 * i for i in range(2_000)]


async def test_a_poison_record_logs_one_warning_naming_its_position_and_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = numbers(tmp_path / "n.txt", 50, bad_at=7)
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(
        doubled_or_fail, aggregate=mb.Count(), max_size=10, workers=1, retries=0, dead_letter=dead
    )
    caplog.set_level(logging.INFO, logger="microbatch")
    assert await pipeline.run(mb.read_lines(src)) == 49  # Count counts the items of each result
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "position" in r.getMessage()]
    assert len(warnings) == 1
    offset = len("".join(f"{i}\n" for i in range(7)))
    assert f"position {offset}" in warnings[0].getMessage() and str(dead) in warnings[0].getMessage()
    infos = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "run started" in infos and "run finished" in infos and "1 dead letters" in infos


async def test_stop_then_map_again_ends_with_every_result(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 300)
    state = tmp_path / "s"
    pipeline = mb.Pipeline(doubled, max_size=10, executor="inline", checkpoint_every_batches=1)
    seen = anyio.Event()
    async with pipeline.updates(mb.read_lines(src), checkpoint=state) as run:
        async for update in run:
            if update.seq == 2:
                await run.stop()
                seen.set()
    assert seen.is_set()
    async with pipeline.map(mb.read_lines(src), checkpoint=state) as results:
        tail = [r async for r in results]
    assert tail[-1] == [2 * i for i in range(290, 300)]


def always_fails(lines: list[str]) -> int:
    raise ValueError(f"no record is valid here: {lines[0]!r}")


async def test_fn_failing_on_every_record_stops_the_run_with_the_first_error(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 100_000)
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(
        always_fails, aggregate=mb.Sum(), max_size=10_000, workers=2, backoff=0.0, dead_letter=dead
    )
    with pytest.raises(mb.TooManyDeadLetters) as info:
        await pipeline.run(mb.read_lines(src))
    err = info.value
    # Two dispatchers may each reach the limit before the run stops: 10 or a few more.
    assert re.search(r"\b1\d records in a row", str(err)) and "no record is valid here" in str(err)
    assert isinstance(err, mb.BatchFailed) and isinstance(err.cause, ValueError)
    # The worker's traceback travels with the first failure.
    assert isinstance(err.cause.__cause__, mb.RemoteTraceback)
    assert "always_fails" in err.cause.__cause__.tb
    # The batch that stopped the run is not folded: a rerun after a fix runs it again.
    assert not dead.exists()


def fails_on_odd_hundreds(lines: list[str]) -> int:
    if any((int(x) // 100) % 2 for x in lines):
        raise ValueError("odd hundred")
    return len(lines)


async def test_failures_separated_by_successes_do_not_stop_the_run(tmp_path: Path) -> None:
    # 1,000 records, 500 of them bad in blocks of 100: each block is 100 dead letters in a row.
    src = numbers(tmp_path / "n.txt", 1_000)
    pipeline = mb.Pipeline(
        fails_on_odd_hundreds,
        aggregate=mb.Sum(),
        max_size=100,
        executor="inline",
        retries=0,
        dead_letter=tmp_path / "dl.jsonl",
        max_dead_letters_in_a_row=None,
    )
    assert await pipeline.run(mb.read_lines(src)) == 500
    with pytest.raises(mb.TooManyDeadLetters):
        await pipeline.replace(max_dead_letters_in_a_row=100).run(mb.read_lines(src))
    assert await pipeline.replace(max_dead_letters_in_a_row=101).run(mb.read_lines(src)) == 500


def test_max_dead_letters_in_a_row_is_checked() -> None:
    with pytest.raises(ValueError, match="max_dead_letters_in_a_row"):
        mb.Pipeline(len, max_dead_letters_in_a_row=0)
    with pytest.raises(TypeError, match="max_dead_letters_in_a_row"):
        mb.Pipeline(len, max_dead_letters_in_a_row=True)


def parse_all(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


async def test_an_undecodable_line_is_dead_lettered_with_its_original_bytes(tmp_path: Path) -> None:
    import base64
    import json

    src = tmp_path / "n.txt"
    src.write_bytes(b"1\n2\n\xff\xfe3\n4\n")
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(parse_all, aggregate=mb.Sum(), max_size=10, workers=1, retries=0, dead_letter=dead)
    assert await pipeline.run(mb.read_lines(src)) == 7
    (letter,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert base64.b64decode(letter["record_base64"]) == b"\xff\xfe3"
    assert letter["error"].endswith("SourceDecodeError") and letter["position"] == 4


def crash_on_seven(lines: list[str]) -> int:
    import os

    if "7" in lines:
        os._exit(3)
    return len(lines)


async def test_a_crash_dead_letter_holds_the_workers_exit_not_the_parents_stack(tmp_path: Path) -> None:
    import json

    src = numbers(tmp_path / "n.txt", 20)
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(
        crash_on_seven, aggregate=mb.Sum(), max_size=20, workers=1, retries=0, dead_letter=dead
    )
    assert await pipeline.run(mb.read_lines(src)) == 19
    (letter,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["record"] == "7" and letter["error"] == "WorkerCrashed"
    assert "exit code 3" in letter["traceback"] and "File " not in letter["traceback"]
    assert len(letter["traceback"]) < 500


async def test_batch_failed_keeps_its_cause(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 30, bad_at=3)
    pipeline = mb.Pipeline(doubled_or_fail, max_size=10, executor="inline", retries=0, on_error="raise")
    with pytest.raises(mb.BatchFailed) as info:
        await pipeline.run(mb.read_lines(src))
    assert isinstance(info.value.__cause__, ValueError) and info.value.__cause__ is info.value.cause
