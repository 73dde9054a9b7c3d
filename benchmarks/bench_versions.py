"""Two checkouts of microbatch on the same job, interleaved: did a change make the pipeline slower?

Sum of N integers from a file with 2 workers, as in ``bench_pipeline.py``. Each round runs the
one-process loop, then each checkout's pipeline, every one in a fresh interpreter whose
``PYTHONPATH`` points at that checkout (start-up and imports included; both are byte-compiled
first). The ratio of each round is taken within the round, and the median over rounds is printed,
so a machine whose speed drifts between minutes still compares like with like.

    python benchmarks/bench_versions.py OLD_CHECKOUT NEW_CHECKOUT [--n 5000000] [--rounds 5]

The new checkout runs twice: as it is, and with file splits off (``split_size=None``), to tell
the cost of the trunk from the gain of splits.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = """
import sys, time
start = time.perf_counter()
import anyio, microbatch as mb
def parse_sum(lines):
    return sum(map(int, lines))
if __name__ == "__main__":
    extra = {"split_size": None} if len(sys.argv) > 2 and sys.argv[2] == "no-splits" else {}
    p = mb.Pipeline(parse_sum, aggregate=mb.Sum(), max_size=10_000, workers=2, max_wait=None, **extra)
    total = anyio.run(p.run, mb.read_lines(sys.argv[1]))
    print(total, time.perf_counter() - start)
"""

LOOP = """
import sys, time
start = time.perf_counter()
total = 0
with open(sys.argv[1]) as f:
    for line in f:
        total += int(line)
print(total, time.perf_counter() - start)
"""


def timed(code: str, data: str, checkout: str | None, *args: str) -> tuple[int, float]:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = checkout
    start = time.perf_counter()
    argv = [sys.executable, "-c", code, data, *args]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    return int(out.stdout.split()[0]), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--n", type=int, default=5_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for checkout in (args.old, args.new):
        compileall.compile_dir(os.path.join(checkout, "microbatch"), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "numbers.txt")
        Path(data).write_text("".join(f"{i}\n" for i in range(args.n)))
        expected = args.n * (args.n - 1) // 2
        timed(JOB, data, args.new)  # warm-up, not counted
        variants = {
            "old": (args.old, ()),
            "new": (args.new, ()),
            "new, no splits": (args.new, ("no-splits",)),
        }
        vs_loop: dict[str, list[float]] = {name: [] for name in variants}
        vs_old: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(args.rounds):
            loop = timed(LOOP, data, None)[1]
            walls = {}
            # Each round starts with another variant: none always follows the same one.
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                checkout, extra = variants[name]
                total, walls[name] = timed(JOB, data, checkout, *extra)
                assert total == expected, (name, total)
            for name, wall in walls.items():
                vs_loop[name].append(loop / wall)
                vs_old[name].append(walls["old"] / wall)
        print(f"sum of {args.n:,} integers, 2 workers, {args.rounds} interleaved rounds (medians)")
        for name in variants:
            rounds = ", ".join(f"{c:.2f}" for c in vs_old[name])
            print(
                f"  {name:<15} vs loop {statistics.median(vs_loop[name]):.2f}x, "
                f"vs old {statistics.median(vs_old[name]):.3f}x (per round: {rounds})"
            )


if __name__ == "__main__":
    main()
