"""Jobs for the command's edge cases: keys of every type, a map pipeline, slow batches."""

from __future__ import annotations

import time

import microbatch as mb


def pair_counts(lines: list[str]) -> dict[tuple[str, int], int]:
    """Tuple keys: (first letter, length) of each line."""
    out: dict[tuple[str, int], int] = {}
    for line in lines:
        key = (line[:1], len(line))
        out[key] = out.get(key, 0) + 1
    return out


def code_counts(lines: list[str]) -> dict[int | str, int]:
    """Int keys for lines of digits, str keys for the others."""
    out: dict[int | str, int] = {}
    for line in lines:
        key: int | str = int(line) if line.isdigit() else line
        out[key] = out.get(key, 0) + 1
    return out


def line_counts(lines: list[str]) -> dict[str, int]:
    """Str keys, also for lines of digits."""
    out: dict[str, int] = {}
    for line in lines:
        out[line] = out.get(line, 0) + 1
    return out


def doubled(lines: list[str]) -> list[int]:
    return [2 * int(x) for x in lines]


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def slow_sum(lines: list[str]) -> int:
    """Sleeps on a line reading ``sleep`` (past any --timeout the tests give)."""
    if "sleep" in lines:
        time.sleep(60)
    return sum(int(x) for x in lines if x != "sleep")


tuples = mb.Pipeline(pair_counts, aggregate=mb.ByKey(mb.Sum()), max_size=2, workers=1)
codes = mb.Pipeline(code_counts, aggregate=mb.ByKey(mb.Sum(), shards=4), max_size=2, workers=1)
strings = mb.Pipeline(line_counts, aggregate=mb.ByKey(mb.Sum(), shards=4), max_size=2, workers=1)
mapper: mb.Pipeline[list[int], None] = mb.Pipeline(doubled, max_size=3, workers=1)
total = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=3, workers=1)
slow = mb.Pipeline(slow_sum, aggregate=mb.Sum(), max_size=1, workers=1)
