"""Pipeline throughput and memory against a single process and multiprocessing.Pool.map.

(a) Sum of N integers (one per line) from a file: microbatch with 2 workers against a
    single-process ``for line in f: total += int(line)`` loop and against ``Pool(2).map`` over an
    in-memory list split into chunks.
(b) A CPU-heavy fn (~20 us of Python per record): microbatch with 2 workers against one process.

Every variant runs in its own child process (so peak memory is the RSS of its whole process tree,
sampled every 10 ms); the ratios compare runs made by this script in one go.

    python benchmarks/bench_pipeline.py [--n 10000000] [--heavy 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def parse_sum(lines: list[str]) -> int:
    return sum(map(int, lines))


def heavy(lines: list[str]) -> int:
    total = 0
    for line in lines:
        x = int(line)
        for _ in range(120):  # ~20 us of pure Python
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        total += x & 1
    return total


def _chunk_sum(chunk: list[int]) -> int:
    return sum(chunk)


def variant(name: str, path: str) -> None:
    start = time.perf_counter()
    if name == "loop":
        total = 0
        with open(path) as f:
            for line in f:
                total += int(line)
    elif name == "heavy_loop":
        with open(path) as f:
            total = heavy(f.read().splitlines())
    elif name == "pool":
        import multiprocessing

        with open(path) as f:
            numbers = [int(line) for line in f]
        size = len(numbers) // 10 or 1
        chunks = [numbers[i : i + size] for i in range(0, len(numbers), size)]
        with multiprocessing.Pool(2) as pool:
            total = sum(pool.map(_chunk_sum, chunks))
    elif name in ("microbatch", "heavy_microbatch"):
        import anyio

        import microbatch as mb

        fn = parse_sum if name == "microbatch" else heavy
        pipeline = mb.Pipeline(fn, aggregate=mb.Sum(), max_size=10_000, workers=2, max_wait=None)
        total = anyio.run(pipeline.run, mb.read_lines(path))
    else:
        raise SystemExit(f"unknown variant {name}")
    print(json.dumps({"seconds": time.perf_counter() - start, "total": total}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--heavy", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variant")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.variant:
        variant(args.variant, args.path)
        return

    from _tree import run_variant

    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        numbers = os.path.join(tmp, "numbers.txt")
        with open(numbers, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.n))
        small = os.path.join(tmp, "heavy.txt")
        with open(small, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.heavy))

        def measure(name: str, path: str) -> tuple[float, float, int]:
            runs = [run_variant([me, "--variant", name, "--path", path]) for _ in range(args.repeat)]
            return (
                statistics.median(r["seconds"] for r in runs),
                max(r["peak_rss_mb"] for r in runs),
                runs[0]["total"],
            )

        print(f"(a) sum of {args.n:,} integers from a file, medians of {args.repeat}")
        results = {name: measure(name, numbers) for name in ("loop", "pool", "microbatch")}
        totals = {r[2] for r in results.values()}
        assert len(totals) == 1, f"variants disagree: {results}"
        base = results["loop"][0]
        for name, (secs, rss, _) in results.items():
            print(f"  {name:12s} {secs:7.3f} s  {base / secs:5.2f}x the loop  peak {rss:7.1f} MB")
        print(f"  microbatch vs Pool.map: {results['pool'][0] / results['microbatch'][0]:.2f}x")

        print(f"(b) CPU-heavy fn (~20 us a record), {args.heavy:,} records")
        heavy_results = {name: measure(name, small) for name in ("heavy_loop", "heavy_microbatch")}
        assert heavy_results["heavy_loop"][2] == heavy_results["heavy_microbatch"][2]
        hbase = heavy_results["heavy_loop"][0]
        for name, (secs, rss, _) in heavy_results.items():
            print(f"  {name:17s} {secs:7.3f} s  {hbase / secs:5.2f}x one process  peak {rss:7.1f} MB")


if __name__ == "__main__":
    main()
