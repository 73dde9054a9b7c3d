"""The per-batch function of bench_windows.py, importable by worker processes."""

from __future__ import annotations


def hits(lines: list[str]) -> list[tuple[int, str, int]]:
    """``"<epoch> <key>"`` lines as ``(timestamp, key, 1)``."""
    return [(int(t), key, 1) for t, key in map(str.split, lines)]
