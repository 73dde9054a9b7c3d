"""Benchmark of ``mb.Batcher``: per-item overhead of ``submit`` and throughput against unbatched calls.

Run: ``python benchmarks/bench_batcher.py`` (about a minute). Figures are medians of ``--repeats``
runs, measured in the same process on asyncio, asyncio+uvloop and trio.

1. Overhead. 1,000 concurrent callers each submit ``--per-caller`` items one after the other to a
   Batcher whose fn does nothing (``max_size=64``, ``max_wait=1 ms``). The baseline is the same
   callers calling that fn directly, once per item. The difference, per item, is what ``submit``
   costs: queueing, one event per item, the wake-up of the caller, the batch bookkeeping.
2. Throughput. fn has a fixed cost per call (``--call-ms``, default 1 ms, awaited while holding a
   lock: the model, GPU or rate-limited API behind it serves one call at a time) plus a tiny cost
   per item. 1,000 concurrent callers each need one result; the ratio is the time with one fn call
   per item over the time through a Batcher (``max_size=64``, ``max_wait=1 ms``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import microbatch as mb

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("asyncio", "asyncio", {}),
    ("uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]


async def trivial(items: list[int]) -> list[int]:
    return items


async def overhead_run(callers: int, per_caller: int, batched: bool) -> float:
    """Seconds per item for ``callers`` tasks each submitting ``per_caller`` items in turn."""
    if batched:
        async with mb.Batcher(trivial, max_size=64, max_wait=0.001, max_pending=callers) as batcher:
            submit = batcher.submit

            async def caller(i: int) -> None:
                for _ in range(per_caller):
                    await submit(i)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(callers):
                    tg.start_soon(caller, i)
            elapsed = time.perf_counter() - start
    else:

        async def caller(i: int) -> None:
            for _ in range(per_caller):
                await trivial([i])

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(caller, i)
        elapsed = time.perf_counter() - start
    return elapsed / (callers * per_caller)


def make_costly_fn(call_s: float) -> Callable[[list[int]], Awaitable[list[int]]]:
    lock = anyio.Lock()

    async def costly(items: list[int]) -> list[int]:
        async with lock:  # one call at a time, as a model on one GPU
            await anyio.sleep(call_s)
            return [item * 2 + 1 for item in items]  # the tiny per-item cost

    return costly


async def throughput_run(callers: int, call_s: float, batched: bool) -> float:
    """Seconds for ``callers`` concurrent callers to get one result each."""
    fn = make_costly_fn(call_s)
    results: list[int] = []
    if batched:
        async with mb.Batcher(fn, max_size=64, max_wait=0.001) as batcher:

            async def caller(i: int) -> None:
                results.append(await batcher.submit(i))

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(callers):
                    tg.start_soon(caller, i)
            elapsed = time.perf_counter() - start
    else:

        async def caller(i: int) -> None:
            results.extend(await fn([i]))

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(caller, i)
        elapsed = time.perf_counter() - start
    assert sorted(results) == [i * 2 + 1 for i in range(callers)]
    return elapsed


def median_of(repeats: int, backend: str, options: dict[str, Any], fn: Any, *args: Any) -> float:
    return statistics.median(
        anyio.run(fn, *args, backend=backend, backend_options=options) for _ in range(repeats)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=1000)
    parser.add_argument("--per-caller", type=int, default=20)
    parser.add_argument("--call-ms", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    call_s = args.call_ms / 1000

    print(f"1. submit overhead: {args.callers} concurrent callers x {args.per_caller} items, trivial fn")
    print(f"   {'backend':8} {'Batcher µs/item':>16} {'direct µs/item':>15} {'overhead µs/item':>17}")
    for name, backend, options in BACKENDS:
        batched = median_of(args.repeats, backend, options, overhead_run, args.callers, args.per_caller, True)
        direct = median_of(args.repeats, backend, options, overhead_run, args.callers, args.per_caller, False)
        print(f"   {name:8} {batched * 1e6:16.2f} {direct * 1e6:15.2f} {(batched - direct) * 1e6:17.2f}")

    print(
        f"\n2. throughput: {args.callers} concurrent callers, one item each; fn costs "
        f"{args.call_ms} ms per call (one call at a time) + a tiny per-item cost"
    )
    print(f"   {'backend':8} {'one call/item s':>16} {'Batcher s':>10} {'speed-up':>9}")
    for name, backend, options in BACKENDS:
        repeats = max(1, args.repeats // 2)
        unbatched = median_of(repeats, backend, options, throughput_run, args.callers, call_s, False)
        batched = median_of(args.repeats, backend, options, throughput_run, args.callers, call_s, True)
        print(f"   {name:8} {unbatched:16.3f} {batched:10.4f} {unbatched / batched:8.1f}x")


if __name__ == "__main__":
    main()
