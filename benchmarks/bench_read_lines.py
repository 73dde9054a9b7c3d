"""read_lines throughput against synchronous reading, on asyncio, uvloop and trio.

Writes a file of LINES lines to a temporary directory, then measures, in one event loop per backend
(medians of REPEATS rounds after a warm-up round; each round runs the synchronous baseline, then the
async variant, so that load changes hit both; the ratio is the median of the per-round ratios):

- per-line ``async for line in read_lines(path)`` vs synchronous ``for line in open(path)``;
- ``read_lines(path).chunks()`` vs a synchronous loop reading 1 MiB blocks and ``bytes.split``;
- ``batches(read_lines(path), max_size=10_000)`` vs the same block loop.

The block loop yields ``bytes``; ``read_lines`` yields ``str`` by default (decoding and building
``str`` objects costs more than splitting ``bytes``), so the ``encoding=None`` rows compare the same
work, and the last rows compare ``str`` results with a block loop that decodes and splits ``str``.
A ratio above 1 means read_lines is faster.

Run: ``python benchmarks/bench_read_lines.py [LINES]`` (default 1,500,000 lines, about 40 MB).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

import microbatch as mb

try:
    batches = mb.batches  # type: ignore[attr-defined]
except AttributeError:  # exported by the package once batching is wired in
    from microbatch._batching import batches

LINES = int(sys.argv[1]) if len(sys.argv) > 1 else 1_500_000
REPEATS = 7
BLOCK = 1 << 20


def make_file(path: Path) -> None:
    with open(path, "w") as f:
        for i in range(0, LINES, 10_000):
            f.write("".join(f"{j},sensor-{j % 97},{j * 7 % 1000}.25\n" for j in range(i, i + 10_000)))


def sync_lines(path: Path) -> int:
    n = 0
    with open(path) as f:
        for _line in f:
            n += 1
    return n


def sync_blocks(path: Path) -> int:
    n = 0
    rest = b""
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            n += len(parts)
    return n + (1 if rest else 0)


def sync_blocks_str(path: Path) -> int:
    """The block loop doing what ``read_lines`` does by default: decode, then split into ``str``."""
    n = 0
    rest = b""
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            n += len(data[:cut].decode("utf-8").split("\n")) - 1
    return n + (1 if rest else 0)


async def async_lines(path: Path, encoding: str | None) -> int:
    n = 0
    async for _line in mb.read_lines(path, encoding=encoding):
        n += 1
    return n


async def async_chunks(path: Path, encoding: str | None) -> int:
    n = 0
    async for chunk in mb.read_lines(path, encoding=encoding).chunks():
        n += len(chunk)
    return n


async def async_batches(path: Path, encoding: str | None) -> int:
    n = 0
    async with batches(mb.read_lines(path, encoding=encoding), max_size=10_000) as stream:
        async for batch in stream:
            n += len(batch)
    return n


async def measure(
    sync_fn: Callable[[Path], int],
    async_fn: Callable[[Path, str | None], Awaitable[int]],
    path: Path,
    encoding: str | None,
) -> tuple[float, float, float]:
    """Median times of the synchronous baseline and the async variant, and the median of their
    per-round ratios. Rounds alternate the two, inside one event loop (no loop start-up or thread
    pool start-up is timed); a first round warms both up and is not counted."""
    sync_times, async_times = [], []
    for round_ in range(REPEATS + 1):
        start = time.perf_counter()
        assert sync_fn(path) == LINES
        t_sync = time.perf_counter() - start
        start = time.perf_counter()
        assert await async_fn(path, encoding) == LINES
        t_async = time.perf_counter() - start
        if round_:
            sync_times.append(t_sync)
            async_times.append(t_async)
    ratio = statistics.median(s / a for s, a in zip(sync_times, async_times, strict=True))
    return statistics.median(sync_times), statistics.median(async_times), ratio


Row = tuple[str, Any, str | None, Callable[[Path], int], str]


async def run_rows(rows: list[Row], name: str, path: Path) -> None:
    for label, fn, encoding, base, against in rows:
        t_sync, t_async, ratio = await measure(base, fn, path, encoding)
        print(f"{name:8} {label:34} {against:20} {t_sync:7.3f} {t_async:8.3f} {ratio:6.2f}", flush=True)


def main() -> None:
    backends: list[tuple[str, str, dict[str, Any]]] = [("asyncio", "asyncio", {})]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    else:
        backends.append(("uvloop", "asyncio", {"use_uvloop": True}))
    backends.append(("trio", "trio", {}))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.txt"
        make_file(path)
        size = path.stat().st_size
        print(
            f"{LINES:,} lines, {size / 1e6:.1f} MB; medians of {REPEATS} interleaved rounds after a warm-up "
            f"round (ratio: median of the per-round ratios)"
        )
        print(f"{'backend':8} {'measure':34} {'baseline':20} {'sync s':>7} {'async s':>8} {'ratio':>6}")
        rows = [
            ("async for line (str)", async_lines, "utf-8", sync_lines, "for line in open"),
            ("async for line (bytes)", async_lines, None, sync_lines, "for line in open"),
            ("chunks() (str)", async_chunks, "utf-8", sync_blocks, "1 MiB blocks+split"),
            ("chunks() (bytes)", async_chunks, None, sync_blocks, "1 MiB blocks+split"),
            ("batches(max_size=10_000) (str)", async_batches, "utf-8", sync_blocks, "1 MiB blocks+split"),
            ("batches(max_size=10_000) (bytes)", async_batches, None, sync_blocks, "1 MiB blocks+split"),
            ("chunks() (str)", async_chunks, "utf-8", sync_blocks_str, "blocks+decode+split"),
            (
                "batches(max_size=10_000) (str)",
                async_batches,
                "utf-8",
                sync_blocks_str,
                "blocks+decode+split",
            ),
        ]
        for name, backend, options in backends:
            anyio.run(run_rows, rows, name, path, backend=backend, backend_options=options)


if __name__ == "__main__":
    main()
