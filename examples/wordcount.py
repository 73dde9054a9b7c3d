"""Count words in a text file and keep the ten most common, batch by batch.

    python examples/wordcount.py [PATH]
    microbatch run examples/wordcount.py:pipeline --input examples/data/sample.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import anyio

import microbatch as mb

SAMPLE = Path(__file__).parent / "data" / "sample.txt"
WORD = re.compile(r"[a-z']+")


def count_words(lines: list[str]) -> dict[str, int]:
    """Runs in a worker process: word counts of one batch of lines."""
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(WORD.findall(line.lower()))
    return dict(counts)


pipeline = mb.Pipeline(count_words, aggregate=mb.TopK(10), max_size=20, workers=2)


async def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE
    async with pipeline.updates(mb.read_lines(path)) as updates:
        async for update in updates:
            print(f"batch {update.seq}: {update.records} lines", file=sys.stderr)
    for word, count in updates.value:
        print(f"{count:8d}  {word}")


if __name__ == "__main__":
    anyio.run(main)
