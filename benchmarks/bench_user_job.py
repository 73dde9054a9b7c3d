"""A user's job, run as a user runs it: ``python job.py numbers.txt``, against a plain loop.

Run: ``python benchmarks/bench_user_job.py [--n 10000000] [--rounds 5]`` (about a minute).

The job is a script (its ``fn`` is defined in ``__main__``, so it travels to the workers by value)::

    def parse_sum(lines):
        return sum(int(x) for x in lines)

    pipeline = mb.Pipeline(parse_sum, aggregate=mb.Sum(), workers=2)
    print(anyio.run(pipeline.run, mb.read_lines(path)))

with the defaults (file splits of 2 MiB). The loop is ``for line in f: total += int(line)``. Each
variant runs in a fresh interpreter, timed from outside (start-up, imports, worker start and
shutdown included), rounds interleaved; the code is byte-compiled first. The job runs twice:
as it is (workers forked from a fork server) and with each worker a fresh interpreter (``spawn``).

Figures, medians over rounds:

- the loop's wall time over the job's (per round, then the median): the end-to-end ratio;
- the fixed cost of a run: the job over a one-line file (wall; CPU of the pipeline process; CPU of
  the workers and the fork server);
- per line: the workers' CPU over the 10M-line run less the one-line run's, against the loop's.
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
import resource, sys
import anyio
import microbatch as mb
if sys.argv[2] == "spawn":
    from microbatch.executors import process
    process._FORK_SERVER = False

def parse_sum(lines):
    return sum(int(x) for x in lines)

if __name__ == "__main__":
    pipeline = mb.Pipeline(parse_sum, aggregate=mb.Sum(), workers=2)
    total = anyio.run(pipeline.run, mb.read_lines(sys.argv[1]))
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(total, me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime)
"""

LOOP = """
import resource, sys
total = 0
with open(sys.argv[1]) as f:
    for line in f:
        total += int(line)
me = resource.getrusage(resource.RUSAGE_SELF)
print(total, me.ru_utime + me.ru_stime, 0.0)
"""


def timed(script: str, data: str, *args: str) -> tuple[int, float, float, float]:
    """(total, wall, own CPU, children's CPU) of ``python script data args`` in a fresh interpreter."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, script, data, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    total, own, kids = out.stdout.split()
    return int(total), wall, float(own), float(kids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        job, loop = os.path.join(tmp, "job.py"), os.path.join(tmp, "loop.py")
        Path(job).write_text(JOB)
        Path(loop).write_text(LOOP)
        data, one = os.path.join(tmp, "numbers.txt"), os.path.join(tmp, "one.txt")
        Path(data).write_text("".join(f"{i}\n" for i in range(args.n)))
        Path(one).write_text("1\n")
        expected = args.n * (args.n - 1) // 2
        timed(job, data, "fork")  # warm-up (page cache), not counted
        variants = ("fork", "spawn")
        ratio: dict[str, list[float]] = {v: [] for v in variants}
        fixed: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        per_line: dict[str, list[float]] = {v: [] for v in variants}
        loop_line: list[float] = []
        for round_ in range(args.rounds):
            total, loop_wall, loop_cpu, _ = timed(loop, data)
            assert total == expected
            loop_line.append(loop_cpu / args.n)
            for name in variants if round_ % 2 == 0 else variants[::-1]:
                total, wall, _, kids = timed(job, data, name)
                assert total == expected, (name, total)
                _, one_wall, one_own, one_kids = timed(job, one, name)
                ratio[name].append(loop_wall / wall)
                fixed[name].append((one_wall, one_own, one_kids))
                per_line[name].append((kids - one_kids) / args.n)
    print(f"sum(int(x) for x in lines) over {args.n:,} lines, 2 workers, a fresh interpreter per run, "
          f"{args.rounds} interleaved rounds (medians):")
    print(f"  the loop: {statistics.median(loop_line) * 1e9:.0f} ns of CPU a line")
    for name in variants:
        walls, owns, kids = zip(*fixed[name], strict=True)
        rounds = ", ".join(f"{r:.2f}" for r in ratio[name])
        print(
            f"  workers {'forked from a fork server' if name == 'fork' else 'spawned':27}: "
            f"{statistics.median(ratio[name]):.2f}x the loop (rounds: {rounds}); a one-line run: "
            f"{statistics.median(walls) * 1000:.0f} ms wall, pipeline process "
            f"{statistics.median(owns) * 1000:.0f} ms CPU, workers and server "
            f"{statistics.median(kids) * 1000:.0f} ms; workers' CPU a line "
            f"{statistics.median(per_line[name]) * 1e9:.0f} ns"
        )


if __name__ == "__main__":
    main()
