"""A followed file rotated between two runs, and while the pipeline folds: nothing lost, nothing twice.

Runs stop through the API (``Run.stop()`` once the expected records are folded); orderings are
decided by what was folded, never by sleeps.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

import microbatch as mb
from microbatch._exceptions import CheckpointMismatch

pytestmark = pytest.mark.anyio

POLL = 0.01
SAFETY = 15  # seconds; a net for a stuck test (a record lost: the follow waits forever), not a timing


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def _seq(path: Path, start: int, stop: int, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.writelines(f"{i}\n" for i in range(start, stop))


async def _run_until(pipeline: mb.Pipeline[int, int], source: object, state: Path, records: int) -> int:
    """Follow until at least ``records`` records in all are folded, stop, return the value."""
    with anyio.fail_after(SAFETY):
        async with pipeline.updates(source, checkpoint=state) as updates:
            async for update in updates:
                if update.records >= records:
                    await updates.stop()
    return updates.value


def _pipeline() -> mb.Pipeline[int, int]:
    return mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=300, max_wait=0.05, executor="thread")


async def test_the_rotation_of_the_issue_resumes_with_every_record(tmp_path: Path) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    _seq(log, 0, 1000)
    source = mb.read_lines(log, follow=True, poll_interval=POLL)
    assert await _run_until(_pipeline(), source, state, 1000) == sum(range(1000))
    _seq(log, 1000, 2000, "a")
    os.rename(log, tmp_path / "app.log.1")
    _seq(log, 2000, 4000)
    assert await _run_until(_pipeline(), source, state, 4000) == sum(range(4000))


async def test_several_rotations_while_stopped_are_read_in_order(tmp_path: Path) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    _seq(log, 0, 1000)
    source = mb.read_lines(log, follow=True, poll_interval=POLL)
    await _run_until(_pipeline(), source, state, 1000)
    _seq(log, 1000, 1500, "a")
    os.rename(log, tmp_path / "app.log.1")
    _seq(log, 1500, 2500)
    os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")
    os.rename(log, tmp_path / "app.log.1")
    _seq(log, 2500, 3000)
    assert await _run_until(_pipeline(), source, state, 3000) == sum(range(3000))


async def test_without_follow_a_rotated_file_is_refused(tmp_path: Path) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    _seq(log, 0, 2000)
    pipeline = _pipeline().replace(max_size=100)
    await _run_until(pipeline, mb.read_lines(log), state, 1000)  # stopped halfway
    os.rename(log, tmp_path / "app.log.1")
    _seq(log, 2000, 4000)
    with pytest.raises(CheckpointMismatch, match=r"app\.log was rotated: the data read before is now in"):
        await pipeline.run(mb.read_lines(log), checkpoint=state)
    # The lock was released: a fresh run goes on.
    assert await pipeline.run(mb.read_lines(log), checkpoint=state, fresh=True) == sum(range(2000, 4000))


async def test_a_checkpoint_while_the_old_file_is_folded_names_the_old_file(tmp_path: Path) -> None:
    """Rotated during the run: checkpoints after every batch, the reader ahead of the folder."""
    log, state = tmp_path / "app.log", tmp_path / "state"
    _seq(log, 0, 3000)
    os.rename(log, tmp_path / "app.log.1")
    _seq(log, 3000, 3100)
    pipeline = mb.Pipeline(
        sum_ints, aggregate=mb.Sum(), max_size=100, max_wait=0.05, executor="thread",
        checkpoint_every=None, checkpoint_every_batches=1,
    )
    # Start in the rotated file: the reader reaches the new file while the old one's batches wait.
    source = mb.read_lines(log, follow=True, poll_interval=POLL)
    await _run_until(pipeline, source.continue_rotated(tmp_path / "app.log.1", 0), state, 1500)
    _seq(log, 3100, 3500, "a")
    assert await _run_until(pipeline, source, state, 3500) == sum(range(3500))
