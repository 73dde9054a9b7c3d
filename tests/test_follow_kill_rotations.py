"""kill -9 of a pipeline following a log, rotations while it is down, and a restart: exact.

The pipeline runs in a subprocess; it is killed with SIGKILL once its checkpoint covers what was
written (an event: the checkpoint file's ``records``), never after a sleep. The log is then rotated
by a real ``RotatingFileHandler`` (rename) or by a copy-then-truncate writer (logrotate's
``copytruncate``), and the restarted run ends by itself with ``stop_when_idle``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # upper bound for any wait; never reached when things work

JOB = """
import sys
import anyio
import microbatch as mb


def total(lines):
    return sum(int(x) for x in lines)


async def main(log, state, idle):
    pipeline = mb.Pipeline(total, aggregate=mb.Sum(), max_size=100, max_wait=0.02, executor="thread",
                           checkpoint_every=None, checkpoint_every_batches=1)
    source = mb.read_lines(log, follow=True, poll_interval=0.02,
                           stop_when_idle=None if idle == "-" else float(idle))
    print(await pipeline.run(source, checkpoint=state), flush=True)


anyio.run(main, *sys.argv[1:4])
"""


def _records(state: Path) -> int:
    best = 0
    for path in state.glob("checkpoint-*.json") if state.is_dir() else []:
        try:
            best = max(best, json.loads(path.read_text())["body"]["records"])
        except (OSError, ValueError):  # removed by a newer save meanwhile
            continue
    return best


def _start(tmp: Path, idle: str) -> subprocess.Popen[str]:
    job = tmp / "job.py"
    job.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(job), str(tmp / "app.log"), str(tmp / "state"), idle],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when_folded(proc: subprocess.Popen[str], state: Path, records: int) -> None:
    deadline = time.monotonic() + WAIT
    while _records(state) < records:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"no checkpoint of {records} records"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT)


def _finish(tmp: Path) -> int:
    proc = _start(tmp, "0.5")
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return int(out.splitlines()[-1])


def _lines(start: int, stop: int) -> str:
    return "".join(f"{i}\n" for i in range(start, stop))


def _rotating(log: Path) -> tuple[logging.Logger, logging.handlers.RotatingFileHandler]:
    handler = logging.handlers.RotatingFileHandler(log, maxBytes=0, backupCount=100)
    logger = logging.getLogger(f"kill-{log}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


def test_rename_rotations_while_killed_lose_and_repeat_nothing(tmp_path: Path) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    logger, handler = _rotating(log)
    try:
        for i in range(1000):
            logger.info("%d", i)
        proc = _start(tmp_path, "-")
        _kill_when_folded(proc, state, 1000)
        for n in range(1, 4):  # three rotations while it is down; the checkpointed file is app.log.3
            for i in range(n * 1000, n * 1000 + 500):
                logger.info("%d", i)
            handler.doRollover()
        for i in range(9000, 9100):
            logger.info("%d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    expected = sum(range(1000)) + sum(sum(range(n * 1000, n * 1000 + 500)) for n in range(1, 4))
    assert _finish(tmp_path) == expected + sum(range(9000, 9100))


@pytest.mark.parametrize("truncations", [1, 2])
def test_copytruncate_while_killed_reads_the_rest_from_the_copies(tmp_path: Path, truncations: int) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    log.write_text(_lines(0, 1000))
    proc = _start(tmp_path, "-")
    _kill_when_folded(proc, state, 1000)
    expected = sum(range(1000))
    for n in range(1, truncations + 1):
        with open(log, "a") as f:
            f.write(_lines(n * 1000, n * 1000 + 500))
        expected += sum(range(n * 1000, n * 1000 + 500))
        for old in sorted(tmp_path.glob("app.log.*"), reverse=True):
            old.rename(tmp_path / f"app.log.{int(old.suffix[1:]) + 1}")
        shutil.copyfile(log, tmp_path / "app.log.1")
        os.truncate(log, 0)
    with open(log, "a") as f:
        f.write(_lines(9000, 9100))
    assert _finish(tmp_path) == expected + sum(range(9000, 9100))
