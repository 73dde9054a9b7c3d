"""A checkpointed pipeline over small file splits, for the crash tests:
python splits_resume_job.py NUMBERS STATE DEAD SPLIT_SIZE.

Prints one line per folded batch ("seq records position") and the final value as "done VALUE".
"""

from __future__ import annotations

import sys
import time

import anyio

import microbatch as mb


def slow_sum(lines: list[str]) -> int:
    time.sleep(0.002)
    if "bad" in lines:
        raise ValueError("poison line")
    return sum(int(x) for x in lines)


async def main(numbers: str, state: str, dead: str, split_size: str) -> None:
    pipeline = mb.Pipeline(
        slow_sum,
        aggregate=mb.Sum(),
        max_size=200,
        workers=2,
        retries=0,
        backoff=0.0,
        dead_letter=dead,
        checkpoint_every=None,
        checkpoint_every_batches=1,
        split_size=int(split_size),
    )
    async with pipeline.updates(mb.read_lines(numbers), checkpoint=state) as updates:
        async for update in updates:
            print(update.seq, update.records, update.position, flush=True)
    print("done", updates.value, flush=True)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
