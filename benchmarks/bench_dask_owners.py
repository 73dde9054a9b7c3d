"""A keyed count with shard owners on a Dask cluster, against the same on local worker processes
and against a one-process ``collections.Counter`` loop.

N records (one str key per line) over K distinct keys in a file. Variants, each in a fresh
interpreter whose start-up is included in its time (measured from outside, by this script):

- ``counter``: the baseline, ``for line in f: counts[line[:-1]] += 1`` into one ``Counter``.
- ``local``: ``Pipeline(Counter, aggregate=ByKey(Count()), workers=2).run(read_lines(path))``: two
  worker processes and two owner processes.
- ``dask``: the same on a ``DaskExecutor`` over a ``LocalCluster`` of 2 single-threaded worker
  processes started by the variant: two owners as Dask actors, one per worker.
- ``dask_here``: the same with ``ByKey(Count(), owners=0)``: the pipeline process folds every key.

Each variant also times its run alone (``run``: without the interpreter's start and, on Dask,
without starting the cluster). Rounds are interleaved; the package and the jobs are byte-compiled
first; ratios are medians of per-round ratios against ``counter``.

    python benchmarks/bench_dask_owners.py [--records 1000000] [--keys 50000] [--repeat 2]
        [--variants counter local dask dask_here] [--split-size BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _jobs import count_keys
from bench_bykey_pipeline import make_file

VARIANTS = ("counter", "local", "dask", "dask_here")


def variant(name: str, path: str, split_size: int | None) -> None:
    check: Any
    if name == "counter":
        start = time.perf_counter()
        counts: Counter[str] = Counter()
        with open(path) as f:
            for line in f:
                counts[line[:-1]] += 1
        run = time.perf_counter() - start
        check = [len(counts), sum(counts.values()), counts["user-0000001"]]
    else:
        import anyio

        import microbatch as mb

        cluster: Any = None
        sizes: dict[str, Any] = {} if split_size is None else {"split_size": split_size}
        if name == "local":
            pipeline = mb.Pipeline(
                count_keys, aggregate=mb.ByKey(mb.Count()), max_wait=None, workers=2, **sizes
            )
        else:
            from distributed import LocalCluster

            from microbatch.executors.dask import DaskExecutor

            cluster = LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            )
            owners = 0 if name == "dask_here" else None
            pipeline = mb.Pipeline(
                count_keys, aggregate=mb.ByKey(mb.Count(), owners=owners), max_wait=None,
                executor=DaskExecutor(cluster), **sizes,
            )

        async def main() -> list[int]:
            result = await pipeline.run(mb.read_lines(path))
            return [len(result), sum(result.values()), result.get("user-0000001", 0)]

        start = time.perf_counter()
        check = anyio.run(main, backend="asyncio")
        run = time.perf_counter() - start
        if cluster is not None:
            cluster.close()
    print(json.dumps({"check": check, "run": run}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--split-size", type=int, help="bytes per split (default: the pipeline's)")
    parser.add_argument("--variant")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.variant:
        variant(args.variant, args.path, args.split_size)
        return

    import compileall

    from _tree import run_variant

    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    here = Path(__file__)
    for name in ("_jobs.py", "_tree.py", "bench_bykey_pipeline.py"):
        compileall.compile_file(str(here.with_name(name)), quiet=1)

    me = str(here.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "keys.txt")
        make_file(path, args.records, args.keys)
        print(f"{args.records:,} records over {args.keys:,} keys; medians of {args.repeat} rounds")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
        for _ in range(args.repeat):
            for name in args.variants:
                start = time.perf_counter()
                argv = [me, "--variant", name, "--path", path]
                if args.split_size is not None:
                    argv += ["--split-size", str(args.split_size)]
                result = run_variant(argv, None)
                result["seconds"] = time.perf_counter() - start
                runs[name].append(result)
        checks = {json.dumps(r["check"]) for rs in runs.values() for r in rs}
        assert len(checks) == 1, f"variants disagree: {checks}"
        base = runs[args.variants[0]]
        for name, rs in runs.items():
            whole = statistics.median(r["seconds"] for r in rs)
            run = statistics.median(r["run"] for r in rs)
            ratio = statistics.median(b["seconds"] / r["seconds"] for b, r in zip(base, rs, strict=True))
            run_ratio = statistics.median(b["run"] / r["run"] for b, r in zip(base, rs, strict=True))
            print(
                f"  {name:10s} whole {whole:6.2f} s {ratio:5.2f}x {args.variants[0]}   "
                f"run {run:6.2f} s {run_ratio:5.2f}x"
            )
        if "dask" in runs and "local" in runs:
            pairs = zip(runs["local"], runs["dask"], strict=True)
            vs = statistics.median(a["run"] / b["run"] for a, b in pairs)
            print(f"  dask vs local (runs): {vs:.2f}x")


if __name__ == "__main__":
    main()
