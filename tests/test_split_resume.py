"""kill -9 at random moments of a run over many small file splits, then resume: the exact value."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _procs import alive as is_alive

HERE = Path(__file__).parent
KILLS = int(os.environ.get("MB_KILLS", "8"))
POISON = {1234: "bad", 7777: "bad"}


def start_job(numbers: Path, state: Path, dead: Path, split_size: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "splits_resume_job.py"), str(numbers), str(state), str(dead),
         str(split_size)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_sigkill_inside_and_between_splits_then_resume_gives_the_uninterrupted_value(tmp_path: Path) -> None:
    numbers, state, dead = tmp_path / "n.txt", tmp_path / "state", tmp_path / "dead.jsonl"
    numbers.write_text("".join(f"{POISON.get(i, i)}\n" for i in range(20_000)))
    expected = sum(i for i in range(20_000) if i not in POISON)
    split_size = 3_000  # about 560 lines: splits of 3 batches, the last one short
    rng = random.Random(int(os.environ.get("MB_SEED", "0")) or None)
    kills = 0
    positions: list[int] = []
    for _ in range(KILLS):
        proc = start_job(numbers, state, dead, split_size)
        assert proc.stdout is not None
        wait_for = rng.randint(1, 15)
        seen = 0
        finished = False
        for line in proc.stdout:
            if line.startswith("done"):
                finished = True
                break
            positions.append(int(line.split()[2]))
            seen += 1
            if seen >= wait_for:
                break
        workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        if not finished:
            time.sleep(rng.random() * 0.02)
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        deadline = time.monotonic() + 5
        while any(is_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(is_alive(p) for p in workers), "workers outlived their killed parent"
        if finished:
            break
    assert kills >= min(KILLS, 3)
    # Batches end inside splits too: checkpoints (one per batch) fell there.
    assert any(p % split_size for p in positions)
    proc = start_job(numbers, state, dead, split_size)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert out.strip().splitlines()[-1] == f"done {expected}"
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    offsets = sorted(len("".join(f"{POISON.get(i, i)}\n" for i in range(n))) for n in POISON)
    assert [(x["record"], x["position"]) for x in letters] == [("bad", o) for o in offsets]
