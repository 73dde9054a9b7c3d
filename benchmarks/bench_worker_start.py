"""CPU a worker process of ``ProcessExecutor`` costs before it runs its first batch.

Run: ``python benchmarks/bench_worker_start.py`` (well under a minute).

Each variant runs in a fresh interpreter (byte-compiled first), rounds interleaved; it starts
``--workers`` workers, makes one call on each, leaves the executor, and reports the CPU time (user +
system) of its reaped children (``getrusage(RUSAGE_CHILDREN)``) per worker:

- ``interpreter``: ``python -c pass`` started ``--workers`` times: the floor any fresh process pays;
- ``start``: a worker started and sent a function from an importable module that needs nothing
  (``_jobs.parse_sum``): the interpreter, ``worker.py`` and the protocol;
- ``pipeline``: the same worker sent what a pipeline sends: a ``BatchTask`` around the function and
  a ``LineBlock`` of lines, whose unpickling imports microbatch's line code in the worker;
- ``main``: a pipeline's task around a function defined in ``__main__`` (a script run by a user),
  which travels by value: unpickling it imports ``cloudpickle`` too.

Each of the last three runs twice: as the executor starts workers (forked from a fork server that
imported all this once; its own CPU is counted, shared by the workers), and ``spawn`` (each worker
a fresh interpreter, ``process._FORK_SERVER = False``). ``--workers`` workers share one fork
server, so its cost per worker falls as they grow: the figure for a replacement worker (a crash, a
recycled worker) is the ``fork`` line, a worker forked from a server that runs already.

Figures: CPU ms per worker, and each variant over ``interpreter``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = ("interpreter", "start", "pipeline", "main", "start-spawn", "pipeline-spawn", "main-spawn", "fork")


def main_parse_sum(lines: list[str]) -> int:  # defined in __main__ when run: travels by value
    return sum(int(x) for x in lines)


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
    from microbatch.executors import process

    kind, _, how = variant.partition("-")
    process._FORK_SERVER = how != "spawn"  # type: ignore[attr-defined]
    fn = main_parse_sum if kind == "main" else parse_sum

    async def call_each(executor: mb.ProcessExecutor) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                if kind == "start":
                    tg.start_soon(executor.run, fn, ["1", "2"])
                else:
                    tg.start_soon(executor.run, BatchTask(fn), LineBlock(b"1\n2\n", 2, 0, 4))

    async def main() -> None:
        # "fork": each worker is replaced after its call (max_tasks_per_worker=1), two rounds more:
        # the replacements are forked from the server that runs already.
        recycle = 1 if kind == "fork" else None
        async with mb.ProcessExecutor(workers, prefetch=0, max_tasks_per_worker=recycle) as executor:
            for _ in range(3 if kind == "fork" else 1):
                await call_each(executor)

    anyio.run(main)
    # The fork server's workers are its children: their CPU counts here once it reaped them and
    # was reaped itself, when the executor was left.
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
    print(f"CPU per worker, {args.workers} workers, median of {args.rounds} rounds "
          f"(forked from a fork server unless -spawn; its own CPU included):")
    for variant in VARIANTS[:-1]:
        median = statistics.median(cpu[variant])
        print(f"  {variant:15} {median * 1000:6.1f} ms  = {median / floor:4.2f}x interpreter  "
              f"(rounds: {', '.join(f'{c * 1000:.0f}' for c in cpu[variant])})")
    # "fork" started each worker three times: twice more than "pipeline", forked from a running server.
    again = [(f - p) / 2 for f, p in zip(cpu["fork"], cpu["pipeline"], strict=True)]
    print(f"  a replacement worker, forked from the running server: {statistics.median(again) * 1000:.1f} ms "
          f"(rounds: {', '.join(f'{c * 1000:.1f}' for c in again)})")


if __name__ == "__main__":
    main()
