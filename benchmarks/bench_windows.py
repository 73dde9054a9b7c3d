"""Time windows: speed against a one-process loop, and peak memory against the span of event time.

``speed``: a 1-minute tumbling ``Windows(ByKey(Count()))`` over N records (``"<epoch> <key>"``
lines, K keys, 24 h of event time in order) with 2 worker processes, every closed window taken from
``pipeline.windows()``, against the baseline: one process reading the same file with a plain loop
that keeps a dict of ``Counter`` per minute and emits each minute's ``(minute, key, count)`` when
a line past its end arrives. Two ways of taking the windows: ``windows`` (``async for`` over a
``WindowResult`` per window and key) and ``by_window`` (``stream.by_window()``, a ``KeyedWindow``
per minute whose ``values.items()`` the consumer walks, as the loop walks its ``Counter``). Each
variant runs in a fresh interpreter, in interleaved rounds; the ratio is baseline seconds / variant
seconds (higher is faster). ``--checkpoints`` adds ``by_window`` writing a checkpoint every 0.1 s
into a folder (keyed windows: the changed windows' files and a manifest).

``steps``: the per-record cost of each step of that pipeline (read, ``fn``, combine, pickle in a
worker; unpickle, fold and close, checkpoint, hand over in the pipeline process), each step alone
over the same file cut in 2 MiB splits, with the cyclic collector on, after ``gc.freeze()`` and off.

``memory``: the same pipeline over 1 day and over 7 days of event time (1,000 keys, the same
records per minute), peak RSS of the pipeline process (its state) and of the largest worker: the
state holds only open windows, so the peaks should match. The file is read in batches of 10,000
lines by the pipeline process (no splits), so that what is in flight is the same few batches in
both runs (with splits of 2 MiB, a 1-day file of 5 MB would hold fewer splits in flight than the
pipeline allows, and the peaks would differ by that, not by the windows).

    python benchmarks/bench_windows.py speed [--records 5000000] [--keys 10000] [--repeat 3] [--checkpoints]
    python benchmarks/bench_windows.py steps [--records 1000000] [--keys 10000] [--repeat 3]
    python benchmarks/bench_windows.py memory [--per-minute 200] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE = 1_700_000_000 - 1_700_000_000 % 86400  # a midnight, UTC
DAY = 86_400


def write_log(path: Path, records: int, keys: int, seconds: int) -> None:
    """``records`` lines ``"<epoch> <key>"`` in order over ``seconds`` of event time."""
    rng = random.Random(2024)
    names = [f"k{i:05d}" for i in range(keys)]
    step = seconds / records
    with path.open("w") as f:
        chunk = []
        for i in range(records):
            chunk.append(f"{BASE + int(i * step)} {names[rng.randrange(keys)]}\n")
            if len(chunk) == 100_000:
                f.write("".join(chunk))
                chunk.clear()
        f.write("".join(chunk))


def baseline(path: Path) -> int:
    """One process: a dict of Counters per minute, each minute emitted when a later line arrives."""
    emitted = 0
    minutes: dict[int, Counter[str]] = {}
    newest = None
    with path.open() as f:
        for line in f:
            t, key = line.split()
            minute = int(t) // 60
            counts = minutes.get(minute)
            if counts is None:
                counts = minutes[minute] = Counter()
            counts[key] += 1
            if newest is None or minute > newest:
                newest = minute
                for old in [m for m in minutes if m < minute]:
                    for _key, _n in minutes.pop(old).items():
                        emitted += 1  # emit (old * 60, key, n)
    for counts in minutes.values():
        emitted += len(counts)
    return emitted


async def windows(path: Path, split_size: int | None = 2 << 20, by_window: bool = False,
                  checkpoint: str | None = None) -> int:
    from _windows_job import hits

    import microbatch as mb

    pipeline = mb.Pipeline(hits, aggregate=mb.Windows(mb.ByKey(mb.Count()), size=60), workers=2,
                           split_size=split_size, checkpoint_every=0.1)
    emitted = 0
    async with pipeline.windows(mb.read_lines(path), checkpoint=checkpoint) as closed:
        if by_window:  # a KeyedWindow per minute: each (minute, key, count) taken from its dict
            async for window in closed.by_window():
                for _key, _n in window.values.items():  # type: ignore[union-attr]
                    emitted += 1
        else:  # a WindowResult per minute and key
            async for _window in closed:
                emitted += 1
    return emitted


def child(variant: str, path: Path) -> None:
    import anyio

    wall, cpu = time.perf_counter(), time.process_time()
    if variant == "loop":
        emitted = baseline(path)
    elif variant == "batches":  # the parent reads the file: memory bounded by batches, not splits
        emitted = anyio.run(windows, path, None)
    elif variant == "by_window":
        emitted = anyio.run(windows, path, 2 << 20, True)
    elif variant == "checkpoints":  # by_window, with a checkpoint every 0.1 s into a folder
        with tempfile.TemporaryDirectory() as tmp:
            emitted = anyio.run(windows, path, 2 << 20, True, str(Path(tmp) / "state"))
    else:
        emitted = anyio.run(windows, path)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"wall": wall, "cpu": cpu, "emitted": emitted, "peak_mb": peak,
                      "worker_mb": kids.ru_maxrss / 1024, "worker_cpu": kids.ru_utime + kids.ru_stime}))


def _run_child(variant: str, path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    done = subprocess.run([sys.executable, __file__, "child", variant, str(path)], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _compile() -> None:
    # PYTHONDONTWRITEBYTECODE is set on these machines: compile once so no child pays for it
    for folder in ("microbatch", "benchmarks"):
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / folder)], check=True)


def speed(args: argparse.Namespace) -> None:
    _compile()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.log"
        write_log(path, args.records, args.keys, DAY)
        runs: dict[str, list[dict[str, Any]]] = {"loop": [], "windows": [], "by_window": []}
        if args.checkpoints:
            runs["checkpoints"] = []
        for _ in range(args.repeat):
            for variant in runs:
                runs[variant].append(_run_child(variant, path))
    assert len({r[0]["emitted"] for r in runs.values()}) == 1, runs
    print(f"{args.records:,} records, {args.keys:,} keys, 24 h of event time, 1-minute tumbling "
          f"ByKey(Count()), {runs['loop'][0]['emitted']:,} windows emitted; medians of {args.repeat} "
          f"interleaved rounds, a fresh interpreter per run")
    base = [r["wall"] for r in runs["loop"]]
    for variant, results in runs.items():
        walls = [r["wall"] for r in results]
        ratio = statistics.median(b / w for b, w in zip(base, walls, strict=True))
        cpu = statistics.median(r["cpu"] for r in results)
        workers = statistics.median(r.get("worker_cpu", 0.0) for r in results)
        print(f"  {variant:11s} {statistics.median(walls):7.2f} s  {ratio:5.2f}x the loop  "
              f"CPU {cpu:5.2f} s here + {workers:5.2f} s in workers  "
              f"peak {statistics.median(r['peak_mb'] for r in results):6.0f} MB")


def steps_child(path: Path, records: int, gc_mode: str) -> None:
    """Per-record costs of each step, on the first ``records`` lines cut in 2 MiB splits: the
    worker's (fn, combine, pickle) and the pipeline process's (unpickle, fold and close, hand over,
    checkpoint dump), one step at a time over every split (the best of 3 passes)."""
    import gc
    import pickle

    from _windows_job import hits

    import microbatch as mb
    from microbatch.aggregate.windows import KeyedWindow, each_result
    from microbatch.checkpoints.shardcodec import encode_document

    with path.open("rb") as f:
        data = b"".join(f.readline() for _ in range(records))
    splits, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start + (2 << 20))
        end = len(data) if end < 0 else end + 1
        splits.append(data[start:end])
        start = end
    agg = mb.Windows(mb.ByKey(mb.Count()), size=60)
    if gc_mode == "freeze":
        gc.freeze()
    elif gc_mode == "off":
        gc.disable()
    costs: dict[str, float] = {}

    def step(name: str, run: Any, inputs: list[Any]) -> list[Any]:
        best, out = float("inf"), []
        for _ in range(3):
            t = time.perf_counter()
            out = [run(x) for x in inputs]
            best = min(best, time.perf_counter() - t)
        costs[name] = best / records * 1e9
        return out

    lines = step("read lines", lambda b: b.decode().splitlines(), splits)
    pairs = step("worker: fn", hits, lines)
    grouped = step("worker: combine", agg.combine, pairs)
    payloads = step("worker: pickle", pickle.dumps, grouped)
    step("unpickle", pickle.loads, payloads)
    fresh = [[pickle.loads(p) for p in payloads] for _ in range(3)]
    best, closed_all = float("inf"), []
    take, encode = 0.0, 0.0
    for run in fresh:
        state, closed_all = agg.initial(), []
        take = encode = 0.0
        t = time.perf_counter()
        for g in run:
            state = agg.fold(state, g)
            closed_all.extend(agg.close_batch(state)[0])
            # a checkpoint after every split: the changes taken in the pipeline process's loop ...
            d = time.perf_counter()
            changes = agg.window_changes(state)
            e = time.perf_counter()
            assert changes is not None
            for keys, states in changes.documents.values():  # ... and encoded in its checkpoint thread
                encode_document({"kind": "base", "shard": 0, "shards": 1, "count": len(keys), "keys": keys,
                                 "states": states})
            take, encode = take + e - d, encode + time.perf_counter() - e
        best = min(best, time.perf_counter() - t - take - encode)
    closed_all.extend(agg.close_all(state))
    costs["fold and close"] = best / records * 1e9
    costs["checkpoint: take changes"] = take / records * 1e9
    costs["checkpoint: encode (thread)"] = encode / records * 1e9

    def by_window(closed: list[Any]) -> int:
        n = 0
        for w in closed:
            for _key, _value in w.values.items() if type(w) is KeyedWindow else [(w.key, w.value)]:
                n += 1
        return n

    def per_key(closed: list[Any]) -> int:
        n = 0
        for _w in each_result(closed):
            n += 1
        return n

    step("hand over: by window", by_window, [closed_all])
    step("hand over: WindowResults", per_key, [closed_all])
    print(json.dumps(costs))


def steps(args: argparse.Namespace) -> None:
    _compile()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.log"
        write_log(path, args.records, args.keys, DAY)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in ("on", "freeze", "off")}
        for _ in range(args.repeat):
            for mode, results in runs.items():
                done = subprocess.run([sys.executable, __file__, "steps-child", str(path), str(args.records),
                                       mode], capture_output=True, text=True, env=env, check=True)
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"ns per record, {args.records:,} records, {args.keys:,} keys over 24 h (as the speed file), "
          f"2 MiB splits; medians of {args.repeat} rounds; gc: on, after gc.freeze(), disabled")
    for name in runs["on"][0]:
        figures = [statistics.median(r[name] for r in results) for results in runs.values()]
        print(f"  {name:30s} " + "  ".join(f"{f:7.1f}" for f in figures))


def memory(args: argparse.Namespace) -> None:
    _compile()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for days in (1, 7):
            paths[days] = Path(tmp) / f"events-{days}d.log"
            write_log(paths[days], args.per_minute * 1440 * days, 1000, DAY * days)
        runs: dict[int, list[dict[str, Any]]] = {1: [], 7: []}
        for _ in range(args.repeat):
            for days in runs:
                runs[days].append(_run_child("batches", paths[days]))
    print(f"1-minute tumbling ByKey(Count()) over 1,000 keys, {args.per_minute} records a minute; "
          f"medians of {args.repeat} interleaved rounds")
    for days, results in runs.items():
        print(f"  {days} day(s): {results[0]['emitted']:9,} windows, pipeline process peak "
              f"{statistics.median(r['peak_mb'] for r in results):6.1f} MB, largest worker "
              f"{statistics.median(r['worker_mb'] for r in results):6.1f} MB, "
              f"{statistics.median(r['wall'] for r in results):6.1f} s")
    one = statistics.median(r["peak_mb"] for r in runs[1])
    seven = statistics.median(r["peak_mb"] for r in runs[7])
    print(f"  peak 7 days / 1 day: {seven / one:.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], Path(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "steps-child":
        steps_child(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--records", type=int, default=5_000_000)
    s.add_argument("--keys", type=int, default=10_000)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--checkpoints", action="store_true", help="also by_window with checkpoints every 0.1 s")
    t = sub.add_parser("steps")
    t.add_argument("--records", type=int, default=1_000_000)
    t.add_argument("--keys", type=int, default=10_000)
    t.add_argument("--repeat", type=int, default=3)
    m = sub.add_parser("memory")
    m.add_argument("--per-minute", type=int, default=200)
    m.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    {"speed": speed, "steps": steps, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
