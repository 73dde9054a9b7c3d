"""What verifying a checkpointed prefix costs on resume: a 1 GiB file, from the page cache.

Variants, each timed in a fresh interpreter, in interleaved rounds:

- ``read``: a plain sequential read of the prefix in 4 MiB blocks, nothing else (the baseline);
- ``full``: ``first_difference`` over the ``"full"`` fingerprint (every byte, hashed in threads);
- ``sampled``: the same over the ``"sampled"`` fingerprint (at most 17 blocks of 64 KiB);
- ``stamp``: computing the ``"full"`` fingerprint from nothing (the first checkpoint of a run).

Prints each variant's median seconds and its ratio to ``read``. The fingerprints are computed once
beforehand, outside the timings.

    python benchmarks/bench_verify.py [--size-mib 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("read", "full", "sampled", "stamp")


def one(variant: str, path: str, fingerprints: str) -> float:
    from microbatch.checkpoints.prefix import first_difference, prefix_ranges

    ranges = {k: [tuple(r) for r in v] for k, v in json.loads(Path(fingerprints).read_text()).items()}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start = time.perf_counter()
        if variant == "read":
            at = 0
            while at < size:
                at += len(os.pread(fd, 4 << 20, at))
        elif variant == "stamp":
            prefix_ranges(fd, size, "full")
        else:
            assert first_difference(fd, ranges[variant]) is None  # type: ignore[arg-type]
        return time.perf_counter() - start
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "PATH", "FINGERPRINTS"))
    args = parser.parse_args()
    if args.one:
        print(one(*args.one))
        return
    compileall.compile_dir(str(ROOT / "microbatch"), quiet=1)
    from microbatch.checkpoints.prefix import prefix_ranges

    with tempfile.TemporaryDirectory() as tmp:
        path, fingerprints = Path(tmp) / "big.log", Path(tmp) / "fingerprints.json"
        line = b"".join(b"%09d some log text of a plausible length\n" % i for i in range(1 << 14))
        with path.open("wb") as f:
            while f.tell() < args.size_mib << 20:
                f.write(line)
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            fingerprints.write_text(json.dumps({m: prefix_ranges(fd, size, m) for m in ("full", "sampled")}))
        finally:
            os.close(fd)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeat):
            for variant in VARIANTS:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", variant, str(path), str(fingerprints)],
                    env=env, check=True, capture_output=True, text=True,
                ).stdout
                seconds[variant].append(float(out))
    base = statistics.median(seconds["read"])
    print(f"prefix of {size / (1 << 30):.2f} GiB from the page cache, {os.cpu_count()} cores, "
          f"median of {args.repeat} rounds")
    for variant in VARIANTS:
        median = statistics.median(seconds[variant])
        print(f"  {variant:8s} {median:7.3f} s   {median / base:5.2f}x the plain read")


if __name__ == "__main__":
    main()
