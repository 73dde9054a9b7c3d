"""kill -9 plus rotation: ``microbatch run --follow --checkpoint`` on a log written by a real
``RotatingFileHandler`` (200 KB files), killed with SIGKILL several times, each time right after a
new checkpoint appeared, and resumed; then stopped with SIGTERM once every line is folded.

Nothing lost, nothing counted twice: the final value is the sum of every line written. The moments
of the kills come from events (a new checkpoint file), never from sleeps.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from _procs import newest_checkpoint, wait_for

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # upper bound for any wait; never reached when things work
KILLS = 4
LINES = 200_000

JOB = '''
import microbatch as mb


def total(lines):
    return sum(int(x) for x in lines)


pipeline = mb.Pipeline(total, aggregate=mb.Sum(), max_size=2000, max_wait=0.05, workers=2)
'''


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write(path: Path) -> None:
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=200_000, backupCount=1000)
    logger = logging.getLogger("kill-rotation")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(LINES):
            logger.info("%d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_kill_9_during_rotations_loses_and_repeats_nothing(tmp_path: Path) -> None:
    job, log, state = tmp_path / "job.py", tmp_path / "app.log", tmp_path / "state"
    job.write_text(JOB)
    log.touch()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "microbatch", "run", f"{job}:pipeline", "--input", str(log), "--follow",
            "--checkpoint", str(state), "--checkpoint-every", "0", "--json", "--no-progress"]

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_reset_signals)

    writer = threading.Thread(target=_write, args=(log,))
    writer.start()
    proc = start()
    try:
        for _ in range(KILLS):
            before = newest_checkpoint(state)
            wait_for(lambda: (now := newest_checkpoint(state)) is not None and now != before,  # noqa: B023
                     "a new checkpoint", WAIT)
            proc.kill()
            proc.wait(timeout=WAIT)
            proc = start()
        writer.join(timeout=WAIT)
        rotated = len(list(tmp_path.glob("app.log.*")))
        assert rotated >= 5, "the log must have rotated several times"

        def all_folded() -> bool:
            newest = newest_checkpoint(state)
            return newest is not None and newest[1].get("records") == LINES

        try:
            wait_for(all_folded, "every line folded", WAIT)
        except AssertionError:
            proc.kill()
            _, stderr = proc.communicate(timeout=WAIT)
            newest = newest_checkpoint(state)
            records = None if newest is None else newest[1].get("records")
            raise AssertionError(f"folded {records} of {LINES} lines; the last run said:\n{stderr}") from None
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
        writer.join(timeout=WAIT)
    assert proc.returncode == 143, stderr
    assert json.loads(stdout.splitlines()[-1]) == sum(range(LINES)), stderr
