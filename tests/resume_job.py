"""A checkpointed pipeline run used by the crash tests: python resume_job.py NUMBERS STATE DEAD [keyed].

Prints one line per folded batch ("seq records") and the final value as "done VALUE". With
``keyed``, the numbers are summed per key (the number modulo 97) with ``ByKey(Sum())`` in keyed
shard files, and VALUE is ``sum(key * total)`` over the keys, with the number of keys. With
``source``, the numbers come from a user-defined source that resumes from its own positions (line
numbers), in chunks of 37 lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

import microbatch as mb


def slow_sum(lines: list[str]) -> int:
    time.sleep(0.002)
    if "bad" in lines:
        raise ValueError("poison line")
    return sum(int(x) for x in lines)


def slow_sums_by_key(lines: list[str]) -> dict[int, int]:
    time.sleep(0.002)
    if "bad" in lines:
        raise ValueError("poison line")
    out: dict[int, int] = {}
    for x in map(int, lines):
        out[x % 97] = out.get(x % 97, 0) + x
    return out


class NumbersSource:
    """A user-defined source: the lines of a file from ``start``, 37 a chunk, positioned by line."""

    def __init__(self, path: str, start: int = 0) -> None:
        self.path, self.start = path, start

    def describe(self) -> str:
        return f"numbers:{self.path}"

    async def chunks(self) -> AsyncIterator[mb.Chunk[str]]:
        with open(self.path) as f:
            lines = f.read().splitlines()
        for at in range(self.start, len(lines), 37):
            yield mb.Chunk(lines[at : at + 37], position=min(at + 37, len(lines)))
            await anyio.sleep(0)

    def resume(self, position: int) -> NumbersSource:
        return NumbersSource(self.path, position)


async def main(numbers: str, state: str, dead: str, mode: str = "sum") -> None:
    keyed = mode == "keyed"
    pipeline = mb.Pipeline(
        slow_sums_by_key if keyed else slow_sum,
        aggregate=mb.ByKey(mb.Sum(), shards=5) if keyed else mb.Sum(),
        max_size=200,
        workers=2,
        retries=0,
        backoff=0.0,
        dead_letter=dead,
        checkpoint_every=None,
        checkpoint_every_batches=1,
    )
    source: Any = NumbersSource(numbers) if mode == "source" else mb.read_lines(numbers)
    async with pipeline.updates(source, checkpoint=state) as updates:
        async for update in updates:
            print(update.seq, update.records, flush=True)
    value = updates.value
    if keyed:
        value = f"{sum(key * total for key, total in value.items())} {len(value)}"
    print("done", value, flush=True)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
