"""A job for the command's tests: the three most common words, as a module target."""

from __future__ import annotations

from collections import Counter

import microbatch as mb


def count_words(lines: list[str]) -> dict[str, int]:
    """Runs in a worker: word counts of a batch of lines."""
    return dict(Counter(word for line in lines for word in line.split()))


pipeline = mb.Pipeline(count_words, aggregate=mb.TopK(3), max_size=2, workers=1)
