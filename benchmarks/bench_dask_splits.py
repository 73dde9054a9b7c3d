"""File splits on Dask: the workers read the file themselves, against the local pool and dask.bag.

Sum of N integers (one per line) from a file. A scheduler and 2 single-threaded workers are started
with the ``dask`` command on 127.0.0.1 (as on a cluster: ``tests/_dask_cluster.py``); starting them
is timed once and reported apart. Variants, each in a fresh interpreter, timed from calling
``run()`` (or ``compute()``) to the result (so the local pool's worker start is counted, and the
Dask client's connection):

- ``ProcessExecutor(2)``: splits of the pipeline's default size, read by 2 local worker processes;
- ``DaskExecutor``: splits of the executor's default size (``DaskExecutor.split_size``) and of
  ``--small`` MiB, run as tasks that read the file on the workers;
- ``dask.bag``: ``read_text(path, blocksize=--bag-block MiB).map(int).sum()`` on the same cluster
  (without ``blocksize`` the whole file is one partition, run by one worker).

Rounds are interleaved; figures are medians of ``--repeat`` rounds, ratios medians of per-round
ratios.

    python benchmarks/bench_dask_splits.py [--n 10000000] [--repeat 3] [--small 32] [--bag-block 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def child(variant: str, path: str, address: str, small: int, bag_block: int) -> None:
    """Run one variant in this fresh interpreter; print its seconds and its total as JSON."""
    import anyio
    from _jobs import parse_sum

    import microbatch as mb

    if variant == "dask.bag":
        import dask.bag as db
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(2)
            start = time.perf_counter()
            total = db.read_text(path, blocksize=bag_block << 20).map(int).sum().compute()
    else:
        settings = {}
        if variant == "ProcessExecutor(2)":
            executor: mb.Executor = mb.ProcessExecutor(2)
        else:
            executor = mb.DaskExecutor(address)
            if variant.endswith("MiB splits"):
                settings["split_size"] = small << 20
        pipeline = mb.Pipeline(
            parse_sum, aggregate=mb.Sum(), max_size=10_000, max_wait=None, executor=executor, **settings
        )
        start = time.perf_counter()
        total = anyio.run(pipeline.run, mb.read_lines(path), backend="asyncio")
    print(json.dumps({"seconds": time.perf_counter() - start, "total": int(total)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small", type=int, default=32, help="MiB per split of the second Dask variant")
    parser.add_argument("--bag-block", type=int, default=8, help="dask.bag's blocksize in MiB")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "PATH", "ADDRESS"))
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.small, args.bag_block)
        return

    import anyio
    from _dask_cluster import dask_cluster
    from bench_dask import wait_for_workers

    variants = ["ProcessExecutor(2)", "DaskExecutor", f"DaskExecutor {args.small} MiB splits", "dask.bag"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "numbers.txt")
        with open(path, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.n))
        size = os.path.getsize(path)
        started = time.perf_counter()
        here = str(Path(__file__).parent)
        with dask_cluster(Path(tmp) / "cluster", workers=2, pythonpath=[here]) as cluster:
            address = cluster.scheduler_address
            anyio.run(wait_for_workers, address)
            cluster_start = time.perf_counter() - started
            seconds: dict[str, list[float]] = {v: [] for v in variants}
            totals = set()
            for _ in range(args.repeat):
                for variant in variants:
                    out = subprocess.run(
                        [sys.executable, __file__, "--small", str(args.small), "--bag-block",
                         str(args.bag_block), "--child", variant, path, address],
                        check=True, capture_output=True, text=True,
                    )  # fmt: skip
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    seconds[variant].append(result["seconds"])
                    totals.add(result["total"])
    assert totals == {args.n * (args.n - 1) // 2}, f"variants disagree: {totals}"
    local = seconds["ProcessExecutor(2)"]
    print(
        f"sum of {args.n:,} integers ({size / 2**20:.1f} MiB), 2 workers x 1 thread, medians of "
        f"{args.repeat} interleaved rounds; Dask cluster start {cluster_start:.2f} s (not counted)"
    )
    for variant in variants:
        secs = seconds[variant]
        vs_local = statistics.median(a / b for a, b in zip(local, secs, strict=True))
        vs_bag = statistics.median(b / a for a, b in zip(secs, seconds["dask.bag"], strict=True))
        print(
            f"  {variant:28s} {statistics.median(secs):7.3f} s  {vs_local:5.2f}x ProcessExecutor(2)  "
            f"{vs_bag:5.2f}x dask.bag"
        )


if __name__ == "__main__":
    main()
