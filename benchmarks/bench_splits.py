"""File splits: workers read byte ranges of the file themselves; the parent ships (path, start, end).

Sum of N integers (one per line) from a file, 2 workers, against a one-process
``for line in f: total += int(line)`` loop: microbatch with splits of several sizes and without
splits (the parent reads the file and ships blocks of lines). ``--nice0`` adds each variant with
its workers at the parent's priority (``ProcessExecutor(2, nice=0)``; the default is nice 10, so
that workers do not starve a parent that feeds them): on a machine shared with other work, nice-10
workers get a small share of the CPUs while the loop competes at nice 0. Each variant runs in a fresh
interpreter and times itself from its first line, so imports, starting the workers and shutting
them down are included. Rounds are interleaved (a noisy neighbour slows every variant of a round
alike); ratios are medians of per-round ratios against the loop of the same round. Peak memory is
the RSS of the whole process tree, sampled every 20 ms in one more run of each variant. Also
reported: seconds from calling ``run()`` (entering ``updates()``) to the first folded batch (cold:
the first run in a fresh interpreter; warm: a second run in the same interpreter, from 3 more
runs of each variant), and
the CPU seconds of the whole process tree (user + system, the workers included): when other work
shares the CPUs, wall-clock ratios say more about the neighbours than about the variants.

    python benchmarks/bench_splits.py [--n 10000000] [--repeat 3] [--splits 1,4,16] [--nice0]
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _jobs import parse_sum  # noqa: E402


def variant(name: str, path: str) -> None:
    first = float("nan")
    if name == "loop":
        total = 0
        with open(path) as f:
            for line in f:
                total += int(line)
    else:
        import anyio

        import microbatch as mb

        # "nosplit" or "split<MiB>", optionally "-nice0": workers at the parent's priority
        base, _, nice = name.partition("-")
        split_size = None if base == "nosplit" else int(float(base[5:]) * (1 << 20))
        executor: Any = mb.ProcessExecutor(2, nice=0) if nice == "nice0" else "process"
        pipeline = mb.Pipeline(
            parse_sum, aggregate=mb.Sum(), max_size=10_000, workers=2, max_wait=None,
            split_size=split_size, executor=executor,
        )

        async def run() -> int:
            nonlocal first
            called = time.perf_counter()
            async with pipeline.updates(mb.read_lines(path)) as updates:
                async for _ in updates:
                    if first != first:  # nan: the first folded batch
                        first = time.perf_counter() - called
            return int(updates.value)

        if os.environ.get("BENCH_WARM"):
            # Warm: a first run in this interpreter (imports done, modules loaded), then the timed one.
            anyio.run(run)
            first = float("nan")
        total = anyio.run(run)
    import resource

    cpu = sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    print(json.dumps({"seconds": time.perf_counter() - _T0, "total": total, "first": first, "cpu": cpu}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--splits", default="1,4,16", help="split sizes in MiB, comma-separated")
    parser.add_argument(
        "--nice0", action="store_true", help="also run each split size with workers at nice 0"
    )
    parser.add_argument("--variant")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.variant:
        variant(args.variant, args.path)
        return

    # Byte-compile first, as an installed package is (PYTHONDONTWRITEBYTECODE=1 on these machines).
    import compileall

    from _tree import run_variant

    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    compileall.compile_file(str(Path(__file__).with_name("_jobs.py")), quiet=1)

    me = str(Path(__file__).resolve())
    names = ["loop", "nosplit", *(f"split{s}" for s in args.splits.split(","))]
    if args.nice0:
        names += [f"{name}-nice0" for name in names[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        numbers = os.path.join(tmp, "numbers.txt")
        with open(numbers, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.n))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for _ in range(args.repeat):
            for name in names:
                runs[name].append(run_variant([me, "--variant", name, "--path", numbers], None))
        peaks = {
            name: run_variant([me, "--variant", name, "--path", numbers])["peak_rss_mb"] for name in names
        }
        totals = {r["total"] for rs in runs.values() for r in rs}
        assert len(totals) == 1, f"variants disagree: {totals}"
        size = os.path.getsize(numbers) / 2**20
        print(f"sum of {args.n:,} integers ({size:.0f} MiB), 2 workers; medians of {args.repeat} rounds")
        warm = {}
        os.environ["BENCH_WARM"] = "1"
        for name in names[1:]:  # the time to the first batch of a second run in the same process
            warm[name] = statistics.median(
                run_variant([me, "--variant", name, "--path", numbers], None)["first"] for _ in range(3)
            )
        del os.environ["BENCH_WARM"]
        for name, rs in runs.items():
            secs = statistics.median(r["seconds"] for r in rs)
            ratios = (b["seconds"] / r["seconds"] for b, r in zip(runs["loop"], rs, strict=True))
            ratio = statistics.median(ratios)
            first = statistics.median(r["first"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            first_text = "" if first != first else (
                f"  first batch {first * 1000:4.0f} ms cold, {warm[name] * 1000:4.0f} ms warm"
            )
            print(
                f"  {name:13s} {secs:6.3f} s  {ratio:5.2f}x loop  cpu {cpu:6.3f} s  "
                f"peak {peaks[name]:6.1f} MB{first_text}"
            )


if __name__ == "__main__":
    main()
