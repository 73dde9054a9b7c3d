"""Child processes started during the current test (others, such as a resource tracker left by an
earlier test's Dask cluster, are not the current test's business)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

_before: set[int] = set()


def remember_existing() -> None:
    _before.clear()
    _before.update(p.pid for p in psutil.Process().children(recursive=True))


def new_children(*, zombies: bool = True) -> list[psutil.Process]:
    """Children started since the test began; with ``zombies=False`` only the running ones."""
    found = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in _before:
            continue
        try:
            if not zombies and p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        found.append(p)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def own_io() -> tuple[int, int]:
    """Bytes this process's live threads read and wrote (``rchar``, ``wchar``), Linux only.

    Unlike psutil's ``io_counters()`` (``/proc/PID/io``), this leaves out the I/O of the children
    the process has reaped: a Dask ``LocalCluster``'s restarted workers, a pool's exited workers.
    """
    read = written = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
        except OSError:
            continue  # a thread that ended since the listing
        read += int(fields["rchar"])
        written += int(fields["wchar"])
    return read, written


def workers_stop_starting_after(marker: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes start through a wrapper that exits at once when ``marker`` exists, as with a
    broken interpreter or a full process table: a test creates the marker to make new workers fail.
    Each worker is a fresh interpreter (no fork server, which would fork new workers from itself)."""
    from microbatch.executors import process

    monkeypatch.setattr(process, "_FORK_SERVER", False)

    wrapper = folder / "worker.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"if os.path.exists({str(marker)!r}):\n"
        "    sys.exit('cannot start')\n"
        f"runpy.run_path({process._WORKER_SCRIPT!r}, run_name='__main__')\n"
    )
    monkeypatch.setattr(process, "_WORKER_SCRIPT", str(wrapper))


def newest_checkpoint(state: Path) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint file of a checkpoint folder and its body, read from outside the run."""
    names = sorted(p.name for p in state.glob("checkpoint-*.json")) if state.is_dir() else []
    for name in reversed(names):
        try:
            return name, json.loads((state / name).read_text())["body"]
        except (OSError, ValueError):  # removed by a newer save meanwhile
            continue
    return None


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait until ``condition()`` holds (an upper bound, never reached when things work)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill_at_random_lines(command: list[str], kills: int, most_lines: int) -> int:
    """Start ``command`` up to ``kills`` times and SIGKILL it after a random number (1 to
    ``most_lines``) of the lines it prints, unless it printed ``done`` first; the kills made.

    The moments are chosen by what the job printed, not by time. ``MB_SEED`` fixes the draw."""
    rng = random.Random(int(os.environ.get("MB_SEED", "0")) or None)
    made = 0
    for _ in range(kills):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        wait_for, seen, finished = rng.randint(1, most_lines), 0, False
        for line in proc.stdout:
            finished = line.startswith("done")
            seen += 1
            if finished or seen >= wait_for:
                break
        if not finished:
            proc.send_signal(signal.SIGKILL)
            made += 1
        proc.wait()
        if finished:
            break
    return made
