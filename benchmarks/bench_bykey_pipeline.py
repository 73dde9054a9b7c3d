"""A keyed count through a whole pipeline against a one-process ``collections.Counter`` loop.

N records (one str key per line) over K distinct keys in a file. Variants, each in a fresh
interpreter whose start-up is included in its time (measured from outside, by this script):

- ``counter``: the baseline, ``for line in f: counts[line[:-1]] += 1`` into one ``Counter``.
- ``bykey``: ``Pipeline(Counter, aggregate=ByKey(Count()), workers=2).run(read_lines(path))``
  (no checkpoint).
- ``bykey_ckpt``: the same with ``checkpoint=`` a fresh folder and ``checkpoint_every=1``.

Rounds are interleaved (a noisy neighbour slows every variant of a round alike); the package and
the jobs are byte-compiled first. Each variant reports the CPU time of its own process
(``getrusage(RUSAGE_SELF)``) and of its waited-for children (workers, shard owners), from which the
pipeline process's share of the run's CPU, and the longest time between two updates of the run
(the largest of its rounds). Peak RSS of the whole process tree comes from one more,
sampled run of each variant (sampling costs CPU).

    python benchmarks/bench_bykey_pipeline.py [--records 5000000] [--keys 50000 2000000] [--repeat 2]
        [--max-size N] [--split-size BYTES] [--variants counter bykey bykey_ckpt] [--no-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _jobs import count_keys

VARIANTS = ("counter", "bykey", "bykey_ckpt")


def make_file(path: str, records: int, keys: int) -> None:
    rng = random.Random(2024)
    names = [f"user-{i:07d}\n" for i in range(keys)]
    with open(path, "w") as f:
        for start in range(0, records, 100_000):
            f.writelines(names[rng.randrange(keys)] for _ in range(min(100_000, records - start)))


def variant(name: str, path: str, folder: str | None, max_size: int | None, split_size: int | None) -> None:
    check: Any
    gap = 0.0  # the longest time between two updates
    if name == "counter":
        counts: Counter[str] = Counter()
        with open(path) as f:
            for line in f:
                counts[line[:-1]] += 1
        check = [len(counts), sum(counts.values()), counts["user-0000001"]]
    else:
        import anyio

        import microbatch as mb

        ckpt = name == "bykey_ckpt"
        sizes: dict[str, Any] = {} if max_size is None else {"max_size": max_size}
        if split_size is not None:
            sizes["split_size"] = split_size
        pipeline = mb.Pipeline(
            count_keys, aggregate=mb.ByKey(mb.Count()), max_wait=None, workers=2,
            checkpoint_every=1.0 if ckpt else 5.0, **sizes,
        )

        async def main() -> list[int]:
            nonlocal gap
            async with pipeline.start(mb.read_lines(path), checkpoint=folder if ckpt else None) as run:
                last = None
                async for _update in run.updates():
                    now = time.perf_counter()
                    gap = max(gap, 0.0 if last is None else now - last)
                    last = now
                result = await run.result()
            return [len(result), sum(result.values()), result.get("user-0000001", 0)]

        check = anyio.run(main)
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "check": check,
        "self_cpu": me.ru_utime + me.ru_stime,
        "children_cpu": kids.ru_utime + kids.ru_stime,
        "gap": gap,
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=5_000_000)
    parser.add_argument("--keys", type=int, nargs="+", default=[50_000, 2_000_000])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the sampled memory runs")
    parser.add_argument(
        "--max-size", type=int, help="records per batch (default: the pipeline's, whole splits with owners)"
    )
    parser.add_argument("--split-size", type=int, help="bytes per split (default: the pipeline's)")
    parser.add_argument("--variant")
    parser.add_argument("--path")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.variant:
        variant(args.variant, args.path, args.folder, args.max_size, args.split_size)
        return

    import compileall

    from _tree import run_variant

    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    compileall.compile_file(str(Path(__file__).with_name("_jobs.py")), quiet=1)
    compileall.compile_file(str(Path(__file__).with_name("_tree.py")), quiet=1)

    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        for keys in args.keys:
            path = os.path.join(tmp, f"keys-{keys}.txt")
            make_file(path, args.records, keys)
            print(
                f"{args.records:,} records over {keys:,} keys, batches of {args.max_size or 'whole splits'}; "
                f"splits of {args.split_size or 'the default size'}; medians of {args.repeat} "
                "interleaved rounds"
            )

            def once(name: str, sample: bool, path: str = path) -> dict[str, Any]:
                folder = tempfile.mkdtemp(dir=tmp)
                argv = [me, "--variant", name, "--path", path, "--folder", folder]
                if args.max_size is not None:
                    argv += ["--max-size", str(args.max_size)]
                if args.split_size is not None:
                    argv += ["--split-size", str(args.split_size)]
                start = time.perf_counter()
                result = run_variant(argv, 0.05 if sample else None)
                result["seconds"] = time.perf_counter() - start
                return result

            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
            for _ in range(args.repeat):
                for name in args.variants:
                    runs[name].append(once(name, False))
            peaks = {} if args.no_memory else {
                name: once(name, True)["peak_rss_mb"] for name in args.variants
            }
            checks = {json.dumps(r["check"]) for rs in runs.values() for r in rs}
            assert len(checks) == 1, f"variants disagree: {checks}"
            base = runs[args.variants[0]]
            for name, rs in runs.items():
                secs = statistics.median(r["seconds"] for r in rs)
                ratio = statistics.median(
                    b["seconds"] / r["seconds"] for b, r in zip(base, rs, strict=True)
                )
                share = statistics.median(
                    r["self_cpu"] / max(r["self_cpu"] + r["children_cpu"], 1e-9) for r in rs
                )
                cpu = statistics.median(r["self_cpu"] + r["children_cpu"] for r in rs)
                peak = peaks.get(name, float("nan"))
                gap = max(r["gap"] for r in rs)
                print(
                    f"  {name:11s} {secs:7.2f} s  {ratio:5.2f}x {args.variants[0]}  "
                    f"cpu {cpu:6.2f} s (own process {share:4.0%})  peak {peak:7.1f} MB  "
                    f"longest gap between updates {gap:5.2f} s"
                )
            if "bykey" in runs and "bykey_ckpt" in runs:
                vs = statistics.median(
                    a["seconds"] / b["seconds"]
                    for a, b in zip(runs["bykey"], runs["bykey_ckpt"], strict=True)
                )
                print(f"  bykey_ckpt vs bykey: {vs:.2f}x")


if __name__ == "__main__":
    main()
