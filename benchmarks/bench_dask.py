"""The same pipeline on the local process executor and on a Dask cluster on this machine.

A scheduler and two single-threaded workers are started with the ``dask`` command, as they would be
on a real cluster (``dask scheduler``, ``dask worker ADDRESS --nworkers 2 --nthreads 1``), and the
pipeline connects to the scheduler's address. Start-up of the cluster is not timed; start-up of the
process executor's two workers is (it is part of every local run).

(a) Sum of N integers, one per line, from a file: ``ProcessExecutor(2)`` against ``DaskExecutor``
    with its default capacity (the cluster's 2 worker threads) and with ``max_in_flight=4``.
(b) A CPU-heavy fn (~20 us of Python per record): the same three, where per-batch overhead matters less.

The file is read by the pipeline and sent batch by batch (``split_size=None``), the path of a
source that cannot be split; ``bench_dask_splits.py`` measures files read by the workers in splits.
Ratios are medians of ``--repeat`` runs made by this script in one go.

    python benchmarks/bench_dask.py [--n 3000000] [--heavy 200000] [--repeat 3]
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

import microbatch as mb

sys.path.insert(0, str(Path(__file__).parent))
from _jobs import heavy, parse_sum


@contextmanager
def dask_cluster(tmp: str) -> Iterator[str]:
    """A scheduler and 2 worker processes (1 thread each) on 127.0.0.1; yields the scheduler address."""
    scheduler_file = os.path.join(tmp, "scheduler.json")
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", scheduler_file],
        env=env, **quiet,
    )  # fmt: skip
    workers = None
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(scheduler_file):
            if time.monotonic() > deadline or scheduler.poll() is not None:
                raise RuntimeError("the Dask scheduler did not start")
            time.sleep(0.05)
        time.sleep(0.2)  # the file is written in one go, but give the scheduler a moment to listen
        with open(scheduler_file) as f:
            address: str = json.load(f)["address"]
        workers = subprocess.Popen(
            [dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
             "--host", "127.0.0.1"],
            env=env, **quiet,
        )  # fmt: skip
        yield address
    finally:
        for proc in (workers, scheduler):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_once(fn: Callable[[list[str]], int], path: str, executor: mb.Executor) -> tuple[float, int]:
    # split_size=None: one task per batch, read here (bench_dask_splits.py measures file splits).
    pipeline = mb.Pipeline(
        fn, aggregate=mb.Sum(), max_size=10_000, max_wait=None, executor=executor, split_size=None
    )
    start = time.perf_counter()
    total = anyio.run(pipeline.run, mb.read_lines(path))
    return time.perf_counter() - start, total


async def wait_for_workers(address: str) -> int:
    from distributed import Client

    async with Client(address, asynchronous=True) as client:
        await client.wait_for_workers(2, timeout=60)
        nthreads: dict[str, int] = await client.nthreads()
        return sum(nthreads.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3_000_000)
    parser.add_argument("--heavy", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        numbers = os.path.join(tmp, "numbers.txt")
        with open(numbers, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.n))
        small = os.path.join(tmp, "heavy.txt")
        with open(small, "w") as f:
            f.writelines(f"{i}\n" for i in range(args.heavy))

        with dask_cluster(tmp) as address:
            threads = anyio.run(wait_for_workers, address)
            variants: dict[str, Callable[[], Any]] = {
                "ProcessExecutor(2)": lambda: mb.ProcessExecutor(2),
                f"DaskExecutor ({threads} in flight)": lambda: mb.DaskExecutor(address),
                "DaskExecutor (4 in flight)": lambda: mb.DaskExecutor(address, max_in_flight=4),
            }

            def measure(fn: Callable[[list[str]], int], path: str) -> dict[str, float]:
                seconds: dict[str, list[float]] = {name: [] for name in variants}
                totals = set()
                for _ in range(args.repeat):  # interleaved, so that drift hits every variant alike
                    for name, make in variants.items():
                        secs, total = run_once(fn, path, make())
                        seconds[name].append(secs)
                        totals.add(total)
                assert len(totals) == 1, f"variants disagree: {totals}"
                return {name: statistics.median(s) for name, s in seconds.items()}

            for title, fn, path, n in (
                ("(a) sum of integers", parse_sum, numbers, args.n),
                ("(b) CPU-heavy fn (~20 us a record)", heavy, small, args.heavy),
            ):
                print(f"{title}: {n:,} records, batches of 10,000, medians of {args.repeat}")
                results = measure(fn, path)
                base = results["ProcessExecutor(2)"]
                for name, secs in results.items():
                    print(
                        f"  {name:28s} {secs:7.3f} s  {n / secs / 1e6:6.2f} M records/s  "
                        f"{base / secs:5.2f}x ProcessExecutor(2)"
                    )


if __name__ == "__main__":
    main()
