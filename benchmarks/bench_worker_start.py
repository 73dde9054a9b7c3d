"""CPU a worker process of ``ProcessExecutor`` costs before it runs its first batch.

Run: ``python benchmarks/bench_worker_start.py`` (well under a minute).

Each variant runs in a fresh interpreter (byte-compiled first), rounds interleaved; it starts
``--workers`` workers, makes one call on each, leaves the executor, and reports the CPU time (user +
system) of its reaped children (``getrusage(RUSAGE_CHILDREN)``) per worker:

- ``interpreter``: ``python -c pass`` started ``--workers`` times: the floor any fresh process pays;
- ``start``: a worker started and sent a function from an importable module that needs nothing
  (``_jobs.parse_sum``): the interpreter, ``worker.py`` and the protocol;
- ``pipeline``: the same worker sent what a pipeline sends: a ``BatchTask`` around the function and
  a ``LineBlock`` of lines, whose unpickling imports microbatch's line code in the worker.

Figures: CPU ms per worker, and each variant over ``interpreter`` (the share a fork server that
has imported all this already could save).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = ("interpreter", "start", "pipeline")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child(variant: str, workers: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    if variant == "interpreter":
        for _ in range(workers):
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        print(json.dumps({"cpu": children_cpu() / workers}))
        return
    import anyio
    from _jobs import parse_sum

    import microbatch as mb
    from microbatch._core.lines import LineBlock
    from microbatch._core.task import BatchTask

    async def main() -> None:
        async with mb.ProcessExecutor(workers, prefetch=0) as executor:
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    if variant == "start":
                        tg.start_soon(executor.run, parse_sum, ["1", "2"])
                    else:
                        block = LineBlock(b"1\n2\n", 2, 0, 4)
                        tg.start_soon(executor.run, BatchTask(parse_sum), block)

    anyio.run(main)
    print(json.dumps({"cpu": children_cpu() / workers}))


def run(variant: str, workers: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--workers", str(workers)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["cpu"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workers)
        return
    import compileall

    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    compileall.compile_file(str(Path(__file__).with_name("_jobs.py")), quiet=1)
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cpu[variant].append(run(variant, args.workers))
    floor = statistics.median(cpu["interpreter"])
    print(f"CPU per worker, {args.workers} workers, median of {args.rounds} rounds:")
    for variant in VARIANTS:
        median = statistics.median(cpu[variant])
        print(f"  {variant:12} {median * 1000:6.1f} ms  = {median / floor:4.2f}x interpreter  "
              f"(rounds: {', '.join(f'{c * 1000:.0f}' for c in cpu[variant])})")


if __name__ == "__main__":
    main()
