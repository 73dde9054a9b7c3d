"""The per-batch functions the benchmarks share, importable by worker processes."""

from __future__ import annotations

from collections import Counter


def parse_sum(lines: list[str]) -> int:
    """Parse and sum a batch of integer lines: cheap per record, so overheads show."""
    return sum(map(int, lines))


def heavy(lines: list[str]) -> int:
    """About 15-20 us of pure Python per record: overheads hardly matter, parallelism does."""
    total = 0
    for line in lines:
        x = int(line)
        for _ in range(120):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        total += x & 1
    return total


def count_keys(lines: list[str]) -> Counter[str]:
    """Count each line (a key) of a batch: the per-batch combine of a keyed count."""
    return Counter(lines)
