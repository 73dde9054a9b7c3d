"""Records/s of ``mb.batches()`` against a bare ``async for`` over the same per-item async generator.

Two generators: ``records`` yields records that already exist (a list of short strings, the usual
case: records come from a parser or a client), ``range`` yields ``i`` for ``i in range(n)``, the
cheapest generator Python has, so the relative cost of batching is at its highest. Each line
prints the median records/s over the repeats (after a warm-up round) and the median of the
per-round ratios, measured in the same run, on asyncio, uvloop and trio. Times are the CPU time of
this process (nothing here waits for I/O, so it equals the wall time on an idle machine): other
processes on a busy machine then do not skew the ratio.

    python benchmarks/bench_batches.py [--records 1000000] [--repeats 5] [--max-size 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import AsyncIterator, Callable

import anyio

import microbatch as mb

BACKENDS: list[tuple[str, str, dict[str, object]]] = [
    ("asyncio", "asyncio", {}),
    ("uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]


def make_generators(n: int) -> dict[str, Callable[[], AsyncIterator[object]]]:
    records = [f"record {i}" for i in range(n)]

    async def from_records() -> AsyncIterator[object]:
        for record in records:
            yield record

    async def from_range() -> AsyncIterator[object]:
        for i in range(n):
            yield i

    return {"records": from_records, "range": from_range}


async def bare(gen: Callable[[], AsyncIterator[object]], n: int) -> int:
    # The cheapest possible consumer: nothing per record, so the ratio is the strictest one.
    async for _ in gen():
        pass
    return n


async def batched(gen: Callable[[], AsyncIterator[object]], max_size: int, max_wait: float | None) -> int:
    count = 0
    async with mb.batches(gen(), max_size=max_size, max_wait=max_wait) as stream:
        async for batch in stream:
            count += len(batch)
    return count


async def run(n: int, repeats: int, max_size: int) -> None:
    for name, gen in make_generators(n).items():
        rates: dict[str, list[float]] = {"bare": [], "batches": [], "batches+max_wait": []}
        for round_ in range(repeats + 1):
            # Interleaved, so that a noisy neighbour slows all three alike; round 0 warms up.
            for label, job in (
                ("bare", bare(gen, n)),
                ("batches", batched(gen, max_size, None)),
                ("batches+max_wait", batched(gen, max_size, 0.5)),
            ):
                start = time.process_time()
                count = await job
                if round_:
                    rates[label].append(count / (time.process_time() - start))
                assert count == n, (label, count)
        med = {label: statistics.median(values) for label, values in rates.items()}
        # The median of the per-round ratios: a speed drift between rounds cancels out.
        ratio = {
            label: statistics.median(r / b for r, b in zip(rates[label], rates["bare"], strict=True))
            for label in ("batches", "batches+max_wait")
        }
        print(
            f"  {name:8} bare {med['bare'] / 1e6:5.2f} M/s | batches {med['batches'] / 1e6:5.2f} M/s "
            f"ratio {ratio['batches']:.2f} | with max_wait=0.5 "
            f"{med['batches+max_wait'] / 1e6:5.2f} M/s ratio {ratio['batches+max_wait']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-size", type=int, default=1000)
    args = parser.parse_args()
    print(f"batches(gen(), max_size={args.max_size}) vs bare async for; {args.records:,} records, "
          f"median of {args.repeats} after a warm-up round")
    for label, backend, options in BACKENDS:
        print(label)
        anyio.run(run, args.records, args.repeats, args.max_size, backend=backend, backend_options=options)


if __name__ == "__main__":
    main()
