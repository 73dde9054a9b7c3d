"""What folding keyed counts costs, without a pipeline: ByKey/TopK folds vs a one-process Counter loop.

Counts of N records over K distinct str keys, cut into batches of 10,000 records. Every variant
runs in a fresh interpreter (the parent only starts them, in interleaved rounds) on the same
records, generated there from a fixed seed; generation is not timed. Variants:

- ``counter``: the baseline, ``total.update(batch)`` per batch into one ``collections.Counter``.
- ``bykey``: what a pipeline's parent would do with ``fn = Counter``: ``Counter(batch)`` per
  batch, then ``ByKey(Count(), shards=16).fold``.
- ``topk``: the same with ``TopK(10)``.
- ``split``: the worker's side of a sharded fold, ``Counter(batch)`` then ``split_to_bytes``.
- ``owners``: the shard owners' side: ``fold_shard`` of every shard part of every batch (the parts
  are made before the clock starts).
- ``checkpoint``: ``bykey`` plus an incremental checkpoint (``dump_changes`` and
  ``ShardFiles.write``, without fsync) every 20 batches, about once a second of a pipeline's
  throughput at these sizes.

Prints each variant's median seconds, its throughput relative to ``counter`` (higher is faster)
and its CPU time per record.

    python benchmarks/bench_keyed.py [--records 5000000] [--keys 2000000 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 10_000
CHECKPOINT_EVERY = 20
VARIANTS = ["counter", "bykey", "topk", "split", "owners", "checkpoint"]


def make_batches(records: int, keys: int) -> list[list[str]]:
    rng = random.Random(2024)
    names = [f"user-{i:07d}" for i in range(keys)]
    picks = [names[rng.randrange(keys)] for _ in range(records)]
    return [picks[i : i + BATCH] for i in range(0, records, BATCH)]


def run_variant(variant: str, batches: list[list[str]]) -> tuple[float, float, Any]:
    """Run one variant; return wall seconds, CPU seconds and a check value."""
    from microbatch.aggregate import ByKey, Count, TopK, split_to_bytes
    from microbatch.checkpoints.shards import ShardFiles

    agg = ByKey(Count(), shards=16)
    parts: list[dict[int, bytes]] = []
    if variant == "owners":
        parts = [split_to_bytes(Counter(batch), agg) for batch in batches]
    with tempfile.TemporaryDirectory() as tmp:
        files = ShardFiles(tmp, fsync=False)
        wall, cpu = time.perf_counter(), time.process_time()
        check: Any
        if variant == "counter":
            total: Counter[str] = Counter()
            for batch in batches:
                total.update(batch)
            check = len(total)
        elif variant in ("bykey", "checkpoint"):
            state = agg.initial()
            for seq, batch in enumerate(batches):
                state = agg.fold(state, Counter(batch))
                if variant == "checkpoint" and seq % CHECKPOINT_EVERY == 0:
                    files.write(seq, agg.dump_changes(state), shards=16)
            check = len(state)
        elif variant == "topk":
            topk = TopK(10)
            top_state = topk.initial()
            for batch in batches:
                top_state = topk.fold(top_state, Counter(batch))
            check = len(top_state)
        elif variant == "split":
            check = sum(len(split_to_bytes(Counter(batch), agg)) for batch in batches)
        elif variant == "owners":
            owner = agg.initial()
            for part in parts:
                for shard, data in part.items():
                    agg.fold_shard(owner, shard, data)
            check = len(owner)
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        return time.perf_counter() - wall, time.process_time() - cpu, check


def child(variant: str, records: int, keys: int) -> None:
    batches = make_batches(records, keys)
    wall, cpu, check = run_variant(variant, batches)
    print(json.dumps({"wall": wall, "cpu": cpu, "check": check}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=5_000_000)
    parser.add_argument("--keys", type=int, nargs="+", default=[2_000_000, 50_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "RECORDS", "KEYS"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    # PYTHONDONTWRITEBYTECODE is set on these machines: compile once so no child pays for it
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "microbatch")], check=True)
    for keys in args.keys:
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
        for _ in range(args.repeat):
            for variant in args.variants:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", variant, str(args.records), str(keys)],
                    capture_output=True, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                if done.returncode:
                    raise SystemExit(f"variant {variant} failed:\n{done.stderr}")
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
        base = [r["wall"] for r in runs["counter"]] if "counter" in runs else None
        print(f"{args.records:,} records over {keys:,} keys, batches of {BATCH:,}; "
              f"medians of {args.repeat} interleaved rounds, a fresh interpreter per run")
        for variant, results in runs.items():
            walls = [r["wall"] for r in results]
            ratio = (
                f"{statistics.median(b / w for b, w in zip(base, walls, strict=True)):5.2f}x"
                if base else "   - "
            )
            cpu_ns = statistics.median(r["cpu"] for r in results) / args.records * 1e9
            print(f"  {variant:10s} {statistics.median(walls):7.3f} s  {ratio} vs counter  "
                  f"{cpu_ns:6.0f} ns CPU/record")


if __name__ == "__main__":
    main()
