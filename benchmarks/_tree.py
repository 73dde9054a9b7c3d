"""Run one benchmark variant in a child process and sample the RSS of its whole process tree."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import psutil


def run_variant(argv: list[str], interval: float | None = 0.02) -> dict[str, Any]:
    """Run ``python argv...``; return its JSON result line plus ``peak_rss_mb`` of its process tree.

    Sampling takes CPU from the variant (a problem when it keeps every core busy): timed runs pass
    ``interval=None`` and are not sampled; memory is measured in runs of their own.
    """
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    if interval is None:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"variant {argv} failed with exit code {proc.returncode}")
        unsampled: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        unsampled["peak_rss_mb"] = float("nan")
        return unsampled
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(interval)  # type: ignore[arg-type]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"variant {argv} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result
