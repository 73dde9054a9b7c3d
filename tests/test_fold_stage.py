"""The fold stage in a real pipeline: what it saves, when, and what it never builds."""

from __future__ import annotations

from typing import Any

import pytest

import microbatch as mb

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
