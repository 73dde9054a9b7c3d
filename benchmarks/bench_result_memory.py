"""Peak memory of the pipeline process when ``fn`` returns large results.

Run: ``python benchmarks/bench_result_memory.py`` (about a minute; the worker needs about 0.5 GB).

A map pipeline over ``--batches`` batches, one worker, each batch's ``fn`` returning ``--result-mb``
MB of bytes, under ``max_result_bytes="256MB"``; the consumer reads each result's length and drops
it. Each variant runs in a fresh interpreter (byte-compiled first), rounds interleaved, and reports
the pipeline process's own peak RSS (``getrusage``: the workers are not counted):

- ``small``: the same pipeline returning 1 KB per batch: the interpreter, microbatch and the run;
- ``streamed``: large results, unpickled as they are read from the pipe (what ``ProcessExecutor``
  does for answers of 1 MiB or more);
- ``whole``: large results read whole into memory first, then unpickled (the executor with
  streaming turned off, as it read every answer before).

The figures: each variant's peak, and the peak over one result's size (the target: below 2).
``streamed`` is the interpreter plus one result: nothing in the pipeline process refers to a
result once the consumer has taken it (neither the map iterator nor the fold stage while it waits
for the next event), so the previous result is gone before the next one is read. Measured: small
30 MB (0.15x), streamed 230 MB (1.15x), whole 632 MB (3.16x); before those references were
dropped, streamed was 430 MB (2.15x): two results alive at once.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

MB = 1 << 20
VARIANTS = ("small", "streamed", "whole")


def make_result(batch: list[int]) -> bytes:
    return bytes(batch[0])


def child(variant: str, result_mb: int, batches: int, prefetch: int) -> None:
    import anyio

    import microbatch as mb

    if variant == "whole":
        import microbatch.executors.process as process

        process.STREAM_AT = 1 << 62  # type: ignore[attr-defined]
    size = 1024 if variant == "small" else result_mb * MB

    async def main() -> int:
        executor = mb.ProcessExecutor(1, prefetch=prefetch, max_result_bytes="256MB")
        pipeline = mb.Pipeline(make_result, max_size=1, executor=executor, on_error="raise")
        total = 0
        async with pipeline.map([size] * batches) as results:
            async for result in results:
                total += len(result)
                del result
        return total

    total = anyio.run(main)
    assert total == size * batches, total
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"variant": variant, "peak": peak}))


def run(variant: str, result_mb: int, batches: int, prefetch: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--result-mb", str(result_mb),
         "--batches", str(batches), "--prefetch", str(prefetch)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--result-mb", type=int, default=200)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.result_mb, args.batches, args.prefetch)
        return
    import compileall

    import microbatch

    compileall.compile_dir(Path(microbatch.__file__).parent, quiet=1)
    peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            peaks[variant].append(run(variant, args.result_mb, args.batches, args.prefetch))
    one = args.result_mb * MB
    print(f"{args.batches} results of {args.result_mb} MB, one worker, max_result_bytes=256MB; "
          f"pipeline process peak RSS, median of {args.rounds} rounds:")
    for variant in VARIANTS:
        peak = statistics.median(peaks[variant])
        print(f"  {variant:9} {peak / MB:7.0f} MB  = {peak / one:4.2f}x one result  "
              f"(rounds: {', '.join(f'{p / MB:.0f}' for p in peaks[variant])})")
    streamed, whole = statistics.median(peaks["streamed"]), statistics.median(peaks["whole"])
    print(f"  streamed / whole: {streamed / whole:.2f}")


if __name__ == "__main__":
    main()
