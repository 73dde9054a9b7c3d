"""Reruns through the API: an appended input adds just its new lines; changes are refused by name."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import microbatch as mb

pytestmark = pytest.mark.anyio


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def twice_the_sum(lines: list[str]) -> int:
    return 2 * sum(int(x) for x in lines)


SAFETY = 30  # seconds; a net for a stuck test, never what decides an outcome


def pipeline_of(fn: object, **settings: object) -> mb.Pipeline[int, int]:
    return mb.Pipeline(fn, aggregate=mb.Sum(), max_size=100, executor="inline", **settings)  # type: ignore[arg-type]


async def test_a_finished_run_over_an_appended_file_adds_exactly_the_new_lines(tmp_path: Path) -> None:
    src, state = tmp_path / "n.txt", tmp_path / "state"
    src.write_text("".join(f"{i}\n" for i in range(1_000)))
    pipeline = pipeline_of(sum_ints)
    assert await pipeline.run(mb.read_lines(src), checkpoint=state) == sum(range(1_000))
    with src.open("a") as f:
        f.write("".join(f"{i}\n" for i in range(1_000, 1_500)))
    folded: list[int] = []
    async with pipeline.updates(mb.read_lines(src), checkpoint=state) as updates:
        async for update in updates:
            folded.append(update.batch_records)
    assert sum(folded) == 500  # only the appended lines were read
    assert updates.value == sum(range(1_500))
    # Nothing new: the finished run's value, nothing read.
    assert await pipeline.run(mb.read_lines(src), checkpoint=state) == sum(range(1_500))


async def test_a_rewritten_input_is_refused_naming_it_and_fresh_starts_over(tmp_path: Path) -> None:
    src, state = tmp_path / "n.txt", tmp_path / "state"
    src.write_text("".join(f"{i}\n" for i in range(1_000)))
    pipeline = pipeline_of(sum_ints)
    await pipeline.run(mb.read_lines(src), checkpoint=state)
    src.write_text("".join(f"{i}\n" for i in range(5, 900)))  # shorter, other content
    with pytest.raises(mb.CheckpointMismatch, match="the input changed") as info:
        await pipeline.run(mb.read_lines(src), checkpoint=state)
    assert str(src) in str(info.value)
    assert await pipeline.run(mb.read_lines(src), checkpoint=state, fresh=True) == sum(range(5, 900))


async def test_a_changed_fn_or_aggregator_is_refused_unless_accepted(tmp_path: Path) -> None:
    src, state = tmp_path / "n.txt", tmp_path / "state"
    src.write_text("".join(f"{i}\n" for i in range(1_000)))
    async with pipeline_of(sum_ints, checkpoint_every_batches=1).updates(
        mb.read_lines(src), checkpoint=state
    ) as updates:
        async for update in updates:
            if update.seq == 3:
                break
    with pytest.raises(mb.CheckpointMismatch, match="fn changed") as info:
        await pipeline_of(twice_the_sum).run(mb.read_lines(src), checkpoint=state)
    assert "--fresh" in str(info.value) and "accept" in str(info.value)
    with pytest.raises(mb.CheckpointMismatch, match="aggregator changed"):
        await mb.Pipeline(sum_ints, aggregate=mb.Mean(), executor="inline").run(
            mb.read_lines(src), checkpoint=state
        )
    # A change the user knows is compatible: the batches folded keep their sums, the rest double.
    # The final checkpoint covers every folded batch: the 4 delivered, and the next one if it was
    # folded while the consumer left.
    folded = updates.stats.batches
    assert folded in (4, 5)
    value = await pipeline_of(twice_the_sum).run(mb.read_lines(src), checkpoint=state, accept_changes=True)
    assert value == sum(range(100 * folded)) + 2 * sum(range(100 * folded, 1_000))


async def summed_over_tcp(
    pipeline: mb.Pipeline[int, int], data: bytes, state: Path, *, fresh: bool = False
) -> tuple[int, bool]:
    """Run ``pipeline`` over a real TCP server on 127.0.0.1 that one client sends ``data`` to; the
    server is stopped once the value says every line was folded (a run that ends: finished)."""
    expected = sum(int(x) for x in data.split())
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            async with await anyio.connect_tcp("127.0.0.1", server.port) as client:
                await client.send(data)
                async with pipeline.updates(server, checkpoint=state, fresh=fresh) as run:
                    async for update in run:
                        if update.value == expected:
                            server.stop_intake()
                return run.value, run.finished


async def test_a_finished_checkpoint_with_a_tcp_server_is_refused_naming_fresh(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pipeline = pipeline_of(sum_ints, max_wait=0.0)
    assert await summed_over_tcp(pipeline, b"1\n2\n", state) == (3, True)
    # What that run read cannot be read again: the same checkpoint would silently give 3.
    with anyio.fail_after(SAFETY):
        async with mb.tcp_lines(0) as server:
            with pytest.raises(mb.CheckpointFinished) as info:
                await pipeline.run(server, checkpoint=state)
    message = str(info.value)
    assert f"the checkpoint in {state} is of a finished run" in message
    assert "fresh=True" in message and "--fresh" in message
    assert isinstance(info.value, mb.CheckpointError)
    assert await summed_over_tcp(pipeline, b"5\n", state, fresh=True) == (5, True)


async def test_a_finished_checkpoint_of_a_file_or_an_iterable_is_not_refused(tmp_path: Path) -> None:
    src, state, listed = tmp_path / "n.txt", tmp_path / "state", tmp_path / "listed"
    src.write_text("1\n2\n")
    pipeline = pipeline_of(sum_ints)
    for _ in range(2):  # the second run: the finished run's value, nothing read
        assert await pipeline.run(mb.read_lines(src), checkpoint=state) == 3
        assert await pipeline.run(["1", "2", "3"], checkpoint=listed) == 6
    with src.open("a") as f:
        f.write("4\n")
    assert await pipeline.run(mb.read_lines(src), checkpoint=state) == 7  # what arrived is added
