"""A run held in hand: ``async with pipeline.start(source) as run``, on every backend.

Runs that never end by themselves follow a file (``follow=True``); they end by ``await run.stop()``
once a given batch was folded, which an update says: nothing here waits for time to pass.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import microbatch as mb
from microbatch.checkpoints.directory import DirectoryStore
from microbatch.checkpoints.targets import open_store

pytestmark = pytest.mark.anyio

SAFETY = 30  # seconds; a net for a stuck test, never reached when things work


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def numbers(path: Path, n: int) -> Path:
    path.write_text("".join(f"{i}\n" for i in range(n)))
    return path


def pipeline(**settings: object) -> mb.Pipeline[int, int]:
    options: dict[str, object] = {"max_size": 10, "executor": "thread", "workers": 2}
    options.update(settings)
    return mb.Pipeline(sum_ints, aggregate=mb.Sum(), **options)  # type: ignore[arg-type]


def checkpoint(folder: Path) -> mb.Checkpoint:
    store = open_store(folder)
    try:
        cp = store.load()
    finally:
        store.close()
    assert cp is not None
    return cp


def test_run_is_exported_and_start_makes_one(tmp_path: Path) -> None:
    run = pipeline().start(mb.read_lines(numbers(tmp_path / "n.txt", 10)))
    assert isinstance(run, mb.Run)


async def test_result_is_the_value_run_returns_and_the_checkpoint_is_finished(tmp_path: Path) -> None:
    src, state = numbers(tmp_path / "n.txt", 1000), tmp_path / "state"
    async with pipeline().start(mb.read_lines(src), checkpoint=state) as run:
        value = await run.result()
        assert run.finished and run.stats.records == 1000 and run.stats.batches == 100
    assert value == run.value == sum(range(1000))
    cp = checkpoint(state)
    assert cp.finished and cp.batches == 100
    assert await run.result() == value  # again, after the block: the same value


async def test_a_run_without_a_consumer_of_its_updates_does_not_wait_for_one(tmp_path: Path) -> None:
    # queue_size 1 and 300 batches: a run that waited for its updates to be taken would stall.
    src = numbers(tmp_path / "n.txt", 3000)
    with anyio.fail_after(SAFETY):
        async with pipeline(queue_size=1).start(mb.read_lines(src)) as run:
            assert await run.result() == sum(range(3000))


async def test_stop_inside_the_updates_loop_folds_what_was_read_and_the_loop_sees_every_batch(
    tmp_path: Path,
) -> None:
    src, state = numbers(tmp_path / "n.txt", 5000), tmp_path / "state"
    seen: list[mb.Update[int]] = []
    with anyio.fail_after(SAFETY):
        async with pipeline(queue_size=4).start(mb.read_lines(src, follow=True), checkpoint=state) as run:
            async for update in run.updates():
                seen.append(update)
                if update.seq == 3:
                    value = await run.stop()
                    # Stopped: every batch in flight is folded; their updates are held for this loop.
                    assert run.stats.batches >= 4 and not run.finished
    assert [u.seq for u in seen] == list(range(len(seen)))  # none lost, in order
    assert value == run.value == seen[-1].value == sum(range(seen[-1].records))
    assert seen[-1].records < 5000  # intake stopped: the follow did not read on to the end
    cp = checkpoint(state)
    assert not cp.finished and cp.batches == len(seen) and cp.records == seen[-1].records
    # The same run again resumes after the last folded batch.
    with anyio.fail_after(SAFETY):
        async with pipeline().start(mb.read_lines(src, follow=True), checkpoint=state) as again:
            async for update in again.updates():
                if update.records == 5000:
                    assert await again.stop() == sum(range(5000))
    assert again.stats.run_records == 5000 - seen[-1].records


async def test_stop_from_another_task_leaves_the_updates_to_their_consumer_in_order(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 5000)
    seen: list[mb.Update[int]] = []
    stopped: list[int] = []

    with anyio.fail_after(SAFETY):
        async with pipeline().start(mb.read_lines(src, follow=True)) as run:

            async def stop() -> None:
                stopped.append(await run.stop())

            async with anyio.create_task_group() as tg:
                async for update in run.updates():
                    seen.append(update)
                    if update.seq == 2:
                        tg.start_soon(stop)
    assert [u.seq for u in seen] == list(range(len(seen)))
    assert stopped == [seen[-1].value] and run.value == seen[-1].value


async def test_updates_taken_by_result_are_held_for_a_later_iteration(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 200)
    async with pipeline().start(mb.read_lines(src)) as run:
        updates = run.updates()  # asked for, not yet iterated: result() holds them
        value = await run.result()
        held = [update async for update in updates]
    assert [u.seq for u in held] == list(range(20))
    assert held[-1].value == value == sum(range(200))


async def test_stop_twice_and_stop_after_the_end_return_the_same_value(tmp_path: Path) -> None:
    src = numbers(tmp_path / "n.txt", 300)
    async with pipeline().start(mb.read_lines(src)) as run:
        first = await run.result()
        assert await run.stop() == first
    assert await run.stop() == first and run.finished  # the source had ended: still finished


async def test_stop_with_worker_processes_leaves_no_worker(tmp_path: Path) -> None:
    from _procs import new_children

    src = numbers(tmp_path / "n.txt", 2000)
    with anyio.fail_after(SAFETY):
        async with pipeline(executor="process").start(mb.read_lines(src, follow=True)) as run:
            async for update in run.updates():
                if update.seq == 1:
                    value = await run.stop()
    assert value == run.value == sum(range(run.stats.records))
    assert new_children() == []


async def test_leaving_the_block_early_cancels_and_checkpoints_what_was_folded(tmp_path: Path) -> None:
    src, state = numbers(tmp_path / "n.txt", 5000), tmp_path / "state"
    with anyio.fail_after(SAFETY):
        async with pipeline(checkpoint_every_batches=1).start(
            mb.read_lines(src, follow=True), checkpoint=state
        ) as run:
            async for update in run.updates():
                if update.seq == 2:
                    break
    # A batch folded but whose update was not taken is not covered: a rerun delivers it again.
    cp = checkpoint(state)
    assert not cp.finished and 3 <= cp.batches <= run.stats.batches < 500


async def test_a_finished_checkpoint_gives_its_value_without_running(tmp_path: Path) -> None:
    src, state = numbers(tmp_path / "n.txt", 100), tmp_path / "state"
    assert await pipeline().run(mb.read_lines(src), checkpoint=state) == sum(range(100))
    async with pipeline().start(mb.read_lines(src), checkpoint=state) as run:
        assert run.finished  # known on entering: nothing is read
        assert [u async for u in run.updates()] == []
        assert await run.stop() == sum(range(100))
    assert run.stats.run_batches == 0


class BreakableStore(DirectoryStore):
    """A folder store whose saves fail once ``broken`` is set (a disk that fills up)."""

    broken = False

    def save(self, checkpoint: mb.Checkpoint) -> None:
        if self.broken:
            raise mb.CheckpointWriteError(f"cannot write a checkpoint in {self.location}: disk full")
        super().save(checkpoint)


async def test_a_final_checkpoint_that_fails_under_stop_is_raised_there_and_at_the_block_end(
    tmp_path: Path,
) -> None:
    src = numbers(tmp_path / "n.txt", 5000)
    store = BreakableStore(tmp_path / "state")
    failed: list[BaseException] = []

    async def stop(run: mb.Run[int, int]) -> None:
        try:
            await run.stop()
        except mb.CheckpointWriteError as exc:
            failed.append(exc)

    with anyio.fail_after(SAFETY), pytest.raises(mb.CheckpointWriteError, match="disk full"):
        source = mb.read_lines(src, follow=True)
        async with pipeline(checkpoint_every=None).start(source, checkpoint=store) as run:
            async with anyio.create_task_group() as tg:
                async for update in run.updates():
                    if update.seq == 1:
                        store.broken = True
                        tg.start_soon(stop, run)
    assert len(failed) == 1
