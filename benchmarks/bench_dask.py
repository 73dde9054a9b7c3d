"""Dask for a source that cannot be split: batches read by the pipeline and sent to the cluster.

A scheduler and two single-threaded workers are started with the ``dask`` command on 127.0.0.1, as
on a real cluster (``tests/_dask_cluster.py``); starting them is not timed. The file is read by the
pipeline's process and sent batch by batch (``split_size=None``), the path of every source that
cannot be split (TCP, standard input, iterables, user sources); ``bench_dask_splits.py`` measures
files read by the workers in splits.

Jobs, batches of 10,000 records:

(a) sum of N integers, one per line (``--n``): cheap per record, so per-task costs show;
(b) a CPU-heavy fn, ~20 us of Python per record (``--heavy`` records): per-task costs hardly matter.

Variants, each run in a fresh interpreter (byte-compiled first), timed from calling ``run()`` to the
result (the local pool's worker start and the Dask client's connection are counted):

- ``ProcessExecutor(2)``: the local pool, the baseline;
- ``DaskExecutor``: its defaults, batches bundled into tasks of up to ``max_bytes``;
- ``DaskExecutor, one task per batch``: ``max_bytes=None``.

Rounds are interleaved (each round runs every variant of every job once); figures are medians of
``--repeat`` rounds, ratios medians of the per-round ratios against ``ProcessExecutor(2)``.

    python benchmarks/bench_dask.py [--n 3000000] [--heavy 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

#: The executor settings of each Dask variant (the local pool is ``ProcessExecutor(2)``).
DASK_VARIANTS: dict[str, dict[str, Any]] = {
    "DaskExecutor": {},
    "DaskExecutor, one task per batch": {"max_bytes": None},
}
LOCAL = "ProcessExecutor(2)"
VARIANTS = [LOCAL, *DASK_VARIANTS]


def child(variant: str, job: str, path: str, address: str) -> None:
    """Run one variant in this fresh interpreter; print its seconds and its total as JSON."""
    import anyio
    from _jobs import heavy, parse_sum

    import microbatch as mb

    fn = {"sum": parse_sum, "heavy": heavy}[job]
    executor: mb.Executor
    if variant == LOCAL:
        executor = mb.ProcessExecutor(2)
    else:
        executor = mb.DaskExecutor(address, **DASK_VARIANTS[variant])
    pipeline = mb.Pipeline(
        fn, aggregate=mb.Sum(), max_size=10_000, max_wait=None, executor=executor, split_size=None
    )
    start = time.perf_counter()
    total = anyio.run(pipeline.run, mb.read_lines(path), backend="asyncio")
    print(json.dumps({"seconds": time.perf_counter() - start, "total": int(total)}))


async def wait_for_workers(address: str) -> int:
    """The cluster's worker threads, once both workers are connected."""
    from distributed import Client

    async with Client(address, asynchronous=True) as client:
        await client.wait_for_workers(2, timeout=60)
        nthreads: dict[str, int] = await client.nthreads()
        return sum(nthreads.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3_000_000)
    parser.add_argument("--heavy", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "JOB", "PATH", "ADDRESS"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import anyio
    from _dask_cluster import dask_cluster

    import microbatch

    # Fresh interpreters would otherwise compile every module they import (PYTHONDONTWRITEBYTECODE).
    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    compileall.compile_file(str(HERE / "_jobs.py"), quiet=1)

    jobs = {
        "sum": ("(a) sum of integers", args.n),
        "heavy": ("(b) CPU-heavy fn (~20 us a record)", args.heavy),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for job, (_, n) in jobs.items():
            paths[job] = os.path.join(tmp, f"{job}.txt")
            with open(paths[job], "w") as f:
                f.writelines(f"{i}\n" for i in range(n))
        with dask_cluster(Path(tmp) / "cluster", workers=2, pythonpath=[str(HERE)]) as cluster:
            address = cluster.scheduler_address
            threads = anyio.run(wait_for_workers, address)
            seconds: dict[str, dict[str, list[float]]] = {job: {v: [] for v in VARIANTS} for job in jobs}
            totals: dict[str, set[int]] = {job: set() for job in jobs}
            for _ in range(args.repeat):
                for job in jobs:
                    for variant in VARIANTS:
                        out = subprocess.run(
                            [sys.executable, __file__, "--child", variant, job, paths[job], address],
                            check=True, capture_output=True, text=True,
                        )  # fmt: skip
                        result = json.loads(out.stdout.strip().splitlines()[-1])
                        totals[job].add(result["total"])
                        seconds[job][variant].append(result["seconds"])
    assert totals["sum"] == {args.n * (args.n - 1) // 2}, f"wrong sums: {totals['sum']}"
    assert len(totals["heavy"]) == 1, f"variants disagree: {totals['heavy']}"
    print(f"2 Dask workers ({threads} threads), batches of 10,000, medians of {args.repeat} rounds")
    for job, (title, n) in jobs.items():
        print(f"{title}: {n:,} records")
        local = seconds[job][LOCAL]
        for variant in VARIANTS:
            secs = seconds[job][variant]
            ratios = [a / b for a, b in zip(local, secs, strict=True)]
            median = statistics.median(secs)
            print(
                f"  {variant:34s} {median:7.3f} s  {n / median / 1e6:5.2f} M records/s  "
                f"{statistics.median(ratios):5.2f}x {LOCAL}  (rounds: {' '.join(f'{r:.2f}' for r in ratios)})"
            )


if __name__ == "__main__":
    main()
