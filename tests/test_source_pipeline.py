"""A pipeline over a user-defined Source: checkpoints record chunk positions, a resumed run reads
again at most the chunk that was in progress, and the final value is exact."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import microbatch as mb
from microbatch.sources import Chunk

pytestmark = pytest.mark.anyio

N, CHUNK = 1000, 70  # chunks larger than a batch, and not a multiple of it


def total(records: list[int]) -> int:
    return sum(records)


class Log:
    """Records 0..N-1 in chunks of CHUNK; ``yielded`` counts every record handed out, across resumes."""

    def __init__(self, offset: int = 0, yielded: list[int] | None = None) -> None:
        self.offset = offset
        self.yielded: list[int] = [] if yielded is None else yielded

    def describe(self) -> str:
        return "log:numbers"

    async def chunks(self) -> AsyncIterator[Chunk[int]]:
        for lo in range(self.offset, N, CHUNK):
            hi = min(lo + CHUNK, N)
            self.yielded.extend(range(lo, hi))
            yield Chunk(list(range(lo, hi)), {"offset": hi})

    def resume(self, position: Any) -> Log:
        return Log(position["offset"], self.yielded)


def _pipeline() -> mb.Pipeline[Any, Any]:
    return mb.Pipeline(
        total, aggregate=mb.Sum(), max_size=50, workers=1, checkpoint_every=None, checkpoint_every_batches=1
    )


async def test_a_stopped_run_resumes_from_its_chunk_position_with_the_exact_value(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with _pipeline().updates(Log(), checkpoint=state) as updates:
        async for update in updates:
            if update.seq == 4:  # 250 records folded: the fourth chunk is in progress
                break
    log = Log()
    assert await _pipeline().run(log, checkpoint=state) == sum(range(N))
    folded = min(log.yielded)
    assert folded % CHUNK == 0 and folded > 0, "it resumed after the last complete chunk"
    assert len([r for r in log.yielded if r < 250]) < CHUNK, "more than one chunk was read again"
    assert sorted(set(log.yielded)) == list(range(folded, N))
