"""Sum the integers 0..9999 read from a file, in batches of 1,000 on worker processes.

The classic ``multiprocessing.Pool.map`` example splits an in-memory list of 10,000 integers into 10
sub-tasks of 1,000 for 10 processes. As a streaming pipeline the numbers come from a file, batches of
1,000 lines go to the worker processes as they are read, and the partial sums are folded in order.

    python examples/sum_integers.py            # prints 49995000
    microbatch run examples/sum_integers.py:pipeline --input examples/data/numbers.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

import microbatch as mb

NUMBERS = Path(__file__).parent / "data" / "numbers.txt"


def sum_lines(lines: list[str]) -> int:
    """Runs in a worker process: one batch of lines in, its partial sum out."""
    return sum(int(line) for line in lines)


pipeline = mb.Pipeline(sum_lines, aggregate=mb.Sum(), max_size=1_000, workers=2)


def ensure_numbers(path: Path = NUMBERS, count: int = 10_000) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in range(count)))
    return path


async def main() -> None:
    path = ensure_numbers(Path(sys.argv[1]) if len(sys.argv) > 1 else NUMBERS)
    total = await pipeline.run(mb.read_lines(path))
    print(total)


if __name__ == "__main__":
    anyio.run(main)
