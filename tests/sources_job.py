"""A checkpointed pipeline over a NATS stream or many files, for the kill -9 trials.

    python sources_job.py nats URL STREAM STATE [splits] [BACKEND]
    python sources_job.py files PATTERN STATE [BACKEND]

Prints one line per folded batch ("seq records") and the final value as "done VALUE".
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio

import microbatch as mb


def slow_sum(lines: list[str]) -> int:
    time.sleep(0.002)
    return sum(int(x) for x in lines)


async def main(kind: str, *args: str) -> None:
    pipeline = mb.Pipeline(
        slow_sum,
        aggregate=mb.Sum(),
        max_size=100,
        workers=2,
        checkpoint_every=None,
        checkpoint_every_batches=1,
    )
    source: Any
    if kind == "nats":
        url, stream, state = args[:3]
        source = mb.nats_stream(url, stream, until="end", batch=150)
        if args[3:] == ("splits",):  # workers fetch ranges of 1,000 sequences (about 5 KiB)
            pipeline = pipeline.replace(split_size=5_000)
    else:
        pattern, state = args[:2]
        source = mb.read_files(pattern)
    async with pipeline.updates(source, checkpoint=state) as updates:
        async for update in updates:
            print(update.seq, update.records, flush=True)
    print("done", updates.value, flush=True)


if __name__ == "__main__":
    argv = sys.argv[1:]
    backend = argv.pop() if argv[-1] in ("asyncio", "trio") else "asyncio"
    anyio.run(main, *argv, backend=backend)
