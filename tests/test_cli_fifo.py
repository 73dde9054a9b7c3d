"""``microbatch run --input FIFO``: a named pipe is read once a writer comes, and a run whose FIFO
never gets a writer still stops on SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"
GATED = str(JOBS / "gated_sum.py") + ":pipeline"
WAIT = 30.0
# Without a writer the command used to block in open() for good; stopping takes a few event-loop
# turns, so this bound only separates "stops" from "hangs".
STOP_WITHIN = 10.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(JOBS), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("MB_TEST_GATE", None)
    return env


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start(fifo: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "microbatch", "run", GATED, "--input", str(fifo), "--no-progress", "--json"],
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_reset_signals,
    )


def _wait_until_waiting(proc: subprocess.Popen[str], fifo: Path) -> None:
    """Until the command reports that it waits for a writer (read a line of stderr at a time)."""
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if f"waiting for a writer to open {fifo}" in line:
            return
        assert line, f"the command exited: {''.join(seen)}"
    raise AssertionError(f"no 'waiting for a writer' in {''.join(seen)!r}")


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_a_fifo_without_a_writer_stops_on_a_signal(tmp_path: Path, signum: int, code: int) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = _start(fifo)
    try:
        _wait_until_waiting(proc, fifo)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=STOP_WITHIN)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert stdout == "0\n"  # the value of what was folded: nothing


def test_a_fifo_is_read_once_a_writer_comes(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = _start(fifo)
    try:
        _wait_until_waiting(proc, fifo)

        def write() -> None:
            with open(fifo, "w") as writer:
                writer.writelines(f"{i}\n" for i in range(1000))

        writer = threading.Thread(target=write)
        writer.start()
        stdout, stderr = proc.communicate(timeout=WAIT)
        writer.join(WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout == f"{sum(range(1000))}\n"
