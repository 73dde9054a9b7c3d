"""Pipeline throughput and memory against a single process and multiprocessing.Pool.map.

(a) Sum of N integers (one per line) from a file: microbatch with 2 workers against a
    single-process ``for line in f: total += int(line)`` loop and against ``Pool(2).map`` over the
    lines read into an in-memory list and split into 10 sub-tasks.
(b) A CPU-heavy fn (~20 us of Python per record): microbatch with 2 workers against one process.

Every variant runs in its own child process, so each pays its own interpreter start and imports
(microbatch is byte-compiled first, as an installed package is); the ratios compare timed runs made
by this script in one go, interleaved. Peak memory (the RSS of the whole process tree, sampled
every 20 ms) comes from one more run of each variant, since sampling takes CPU from a variant that
uses every core.

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
from _jobs import heavy, parse_sum


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
        # The classic approach: the input as an in-memory list of lines, cut into 10 sub-tasks
        # that Pool(2).map parses and sums in two processes.
        import multiprocessing

        with open(path) as f:
            lines = f.read().splitlines()
        size = -(-len(lines) // 10)
        chunks = [lines[i : i + size] for i in range(0, len(lines), size)]
        with multiprocessing.Pool(2) as pool:
            total = sum(pool.map(parse_sum, chunks))
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

    # Byte-compile microbatch and the jobs first, as pip does when it installs a package: in a
    # source checkout run with PYTHONDONTWRITEBYTECODE=1, every variant (and every worker) would
    # otherwise compile the modules it imports again, about 40 ms per process.
    import compileall

    from _tree import run_variant

    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    compileall.compile_file(str(Path(__file__).with_name("_jobs.py")), quiet=1)

    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        numbers = os.path.join(tmp, "numbers.txt")
        with open(numbers, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.n))
        small = os.path.join(tmp, "heavy.txt")
        with open(small, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.heavy))

        def measure(names: tuple[str, ...], path: str) -> dict[str, list[dict[str, float]]]:
            # Interleaved rounds: a noisy neighbour slows every variant of a round alike.
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
            for _ in range(args.repeat):
                for name in names:
                    runs[name].append(run_variant([me, "--variant", name, "--path", path], None))
            for name in names:  # memory in runs of its own: sampling costs CPU
                runs[name][0]["peak_rss_mb"] = run_variant([me, "--variant", name, "--path", path])[
                    "peak_rss_mb"
                ]
            totals = {r["total"] for rs in runs.values() for r in rs}
            assert len(totals) == 1, f"variants disagree: {totals}"
            return runs

        def report(runs: dict[str, list[dict[str, float]]], base: str) -> None:
            for name, rs in runs.items():
                secs = statistics.median(r["seconds"] for r in rs)
                ratio = statistics.median(
                    b["seconds"] / r["seconds"] for b, r in zip(runs[base], rs, strict=True)
                )
                rss = rs[0]["peak_rss_mb"]
                print(f"  {name:17s} {secs:7.3f} s  {ratio:5.2f}x {base}  peak {rss:7.1f} MB")

        print(f"(a) sum of {args.n:,} integers from a file; medians of {args.repeat} interleaved rounds")
        runs = measure(("loop", "pool", "microbatch"), numbers)
        report(runs, "loop")
        vs_pool = statistics.median(
            p["seconds"] / m["seconds"] for p, m in zip(runs["pool"], runs["microbatch"], strict=True)
        )
        print(f"  microbatch vs Pool.map: {vs_pool:.2f}x")

        print(f"(b) CPU-heavy fn (~20 us a record), {args.heavy:,} records")
        report(measure(("heavy_loop", "heavy_microbatch"), small), "heavy_loop")


if __name__ == "__main__":
    main()
