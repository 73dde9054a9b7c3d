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


# --- --follow on a file that does not exist yet -----------------------------------------------------------


def test_follow_waits_for_a_missing_file_then_reads_it(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    argv = [sys.executable, "-m", "microbatch", "run", GATED, "--input", str(log), "--follow"]
    argv += ["--poll-interval", "0.05", "--max-wait", "0", "--checkpoint", str(tmp_path / "state")]
    proc = subprocess.Popen(
        [*argv, "--no-progress", "--json"],
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_reset_signals,
    )
    try:
        assert proc.stderr is not None
        while f"waiting for {log} to appear" not in (line := proc.stderr.readline()):
            assert line, "the command exited before waiting for the file"
        log.write_text("".join(f"{i}\n" for i in range(100)))
        from microbatch.checkpoints.targets import open_store

        def folded() -> int:
            store = open_store(tmp_path / "state")
            try:
                cp = store.load()
            finally:
                store.close()
            return 0 if cp is None else cp.records

        deadline = time.monotonic() + WAIT
        while not ((tmp_path / "state").exists() and folded() == 100):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the lines were not folded"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert stdout == f"{sum(range(100))}\n"


def test_wait_for_file_gives_up_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "never.log"
    argv = [sys.executable, "-m", "microbatch", "run", GATED, "--input", str(missing), "--follow"]
    done = subprocess.run(
        [*argv, "--wait-for-file", "0.1", "--poll-interval", "0.02", "--no-progress"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 1, done.stderr
    assert f"--input {str(missing)!r} did not appear within 0.1 s (--wait-for-file)" in done.stderr
    present = tmp_path / "present.txt"
    present.write_text("1\n")
    usage = subprocess.run(
        [sys.executable, "-m", "microbatch", "run", GATED, "--input", str(present), "--wait-for-file", "1"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert usage.returncode == 2 and "--wait-for-file waits for a file to follow" in usage.stderr
