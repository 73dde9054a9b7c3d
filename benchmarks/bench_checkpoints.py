"""What checkpoints cost: a pipeline with checkpoints every second and every batch vs none.

Sum of N integers from a file, 2 workers, batches of 10,000; the three variants run in interleaved
rounds in this process, each round with a fresh checkpoint folder. Prints throughput ratios
(no checkpoints = 1.00).

    python benchmarks/bench_checkpoints.py [--n 20000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import microbatch as mb


def parse_sum(lines: list[str]) -> int:
    return sum(map(int, lines))


VARIANTS: dict[str, dict[str, Any]] = {
    "no checkpoints": {},
    "every second": {"checkpoint_every": 1.0},
    "every batch": {"checkpoint_every": None, "checkpoint_every_batches": 1},
}


async def timed(path: Path, state: Path | None, settings: dict[str, Any]) -> tuple[float, int, int]:
    pipeline = mb.Pipeline(parse_sum, aggregate=mb.Sum(), max_size=10_000, workers=2, **settings)
    start = time.perf_counter()
    async with pipeline.updates(mb.read_lines(path), checkpoint=state) as updates:
        async for update in updates:
            checkpoints = update.stats.checkpoints
    return time.perf_counter() - start, updates.value, checkpoints


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "numbers.txt"
        with path.open("w") as f:
            f.writelines(f"{i}\n" for i in range(args.n))
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        counts: dict[str, int] = {}
        for round_no in range(args.repeat):
            for name, settings in VARIANTS.items():
                state = None if not settings else Path(tmp) / f"state-{round_no}-{len(name)}"
                secs, total, checkpoints = anyio.run(timed, path, state, settings)
                assert total == args.n * (args.n - 1) // 2
                seconds[name].append(secs)
                counts[name] = checkpoints
        base = seconds["no checkpoints"]
        print(f"sum of {args.n:,} integers, 2 workers; medians of {args.repeat} interleaved rounds")
        for name, runs in seconds.items():
            ratio = statistics.median(b / s for b, s in zip(base, runs, strict=True))
            print(
                f"  {name:15s} {statistics.median(runs):6.3f} s  {ratio:5.3f}x throughput  "
                f"({counts[name]} checkpoints in the last run)"
            )


if __name__ == "__main__":
    main()
