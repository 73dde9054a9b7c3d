"""kill -9 trials of keyed counts held by shard owners: every result must equal a Counter.

(a) The pipeline process is killed at a random moment (in some trials while a checkpoint barrier is
    being written: when a temporary shard file appears), once or twice, then the same command
    resumes to the end.
(b) A shard owner is killed at random moments (one to three times) while the run goes on; the run
    starts it again from its last checkpoint and ends by itself.

Each run is a child process: ``ByKey(Count())`` with 2 workers and 2 owners over a file of N
records over K keys, a checkpoint every 2 batches. Prints each trial and a summary; exits 1 when a
result differs.

    python benchmarks/bench_owner_kills.py [--pipeline-trials 24] [--owner-trials 12] [--records 200000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

RUN = """
import json, sys, anyio, microbatch as mb
from collections import Counter

def count_lines(lines):
    return Counter(lines)

async def main():
    p = mb.Pipeline(count_lines, aggregate=mb.ByKey(mb.Count(), owners=2), max_size=1000, workers=2,
                    checkpoint_every_batches=2)
    result = await p.run(mb.read_lines(sys.argv[1]), checkpoint=sys.argv[2])
    with open(sys.argv[3], "w") as f:
        json.dump(sorted(result.items()), f)

anyio.run(main)
"""


def digest(items: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def start(script: Path, src: Path, state: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, str(script), str(src), str(state), str(out)], env=env)


def in_barrier(state: Path) -> bool:
    keyed = state / "keyed"
    try:
        return any(name.startswith(".shard-") for name in os.listdir(keyed))
    except FileNotFoundError:
        return False


def kill_pipeline(proc: subprocess.Popen[bytes], state: Path, rng: random.Random, barrier: bool) -> str:
    """Kill ``proc`` at a random moment (or as a barrier writes); what happened."""
    deadline = time.monotonic() + rng.uniform(0.3, 2.0)
    while proc.poll() is None:
        if barrier and in_barrier(state):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed in a barrier"
        if not barrier and time.monotonic() >= deadline:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.002)
    return "ended first"


def owners_of(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return [
            p for p in psutil.Process(proc.pid).children()
            if any("ownerproc.py" in part for part in p.cmdline())
        ]
    except psutil.Error:
        return []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-trials", type=int, default=24)
    parser.add_argument("--owner-trials", type=int, default=12)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=50_000)
    args = parser.parse_args()
    rng = random.Random(21)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src, script = tmp / "in.txt", tmp / "run.py"
        lines = [f"k{rng.randrange(args.keys)}" for _ in range(args.records)]
        src.write_text("".join(f"{line}\n" for line in lines))
        script.write_text(RUN)
        expected = digest(sorted(Counter(lines).items()))

        def check(trial: str, out: Path, what: str) -> None:
            nonlocal failures
            ok = out.exists() and digest([tuple(i) for i in json.loads(out.read_text())]) == expected
            failures += not ok
            print(f"{trial}: {what}: {'exact' if ok else 'DIFFERENT'}", flush=True)

        for trial in range(args.pipeline_trials):
            state, out = tmp / f"p{trial}", tmp / f"p{trial}.json"
            what = []
            for _ in range(1 + trial % 2):
                barrier = trial % 3 == 0
                what.append(kill_pipeline(start(script, src, state, out), state, rng, barrier))
            proc = start(script, src, state, out)
            proc.wait()
            check(f"pipeline trial {trial}", out, ", ".join(what) + ", resumed")

        for trial in range(args.owner_trials):
            state, out = tmp / f"o{trial}", tmp / f"o{trial}.json"
            proc = start(script, src, state, out)
            kills = 1 + trial % 3
            done = 0
            while proc.poll() is None and done < kills:
                time.sleep(rng.uniform(0.3, 1.5))
                owners = owners_of(proc)
                if owners:
                    victim = rng.choice(owners)
                    try:
                        victim.send_signal(signal.SIGKILL)
                        done += 1
                    except psutil.Error:
                        pass
            proc.wait()
            check(f"owner trial {trial}", out, f"{done} owner(s) killed, exit {proc.returncode}")
    total = args.pipeline_trials + args.owner_trials
    print(f"{total - failures} of {total} trials exact")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
