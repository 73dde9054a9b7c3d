"""The command under faults: signals sent to its whole process group, results of job-file classes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_cli import (
    GATED,
    TOTAL,
    WAIT,
    _checkpoint,
    _env,
    _paused_worker,
    _peek,
    _start,
    _wait_for,
    mb,
)


def _start_in_own_session(
    paused_numbers: Path, tmp_path: Path
) -> tuple[list[str], subprocess.Popen[str], Path, Path]:
    """A checkpointed run whose batch 50 pauses, in a session (process group) of its own, as under
    systemd's control group or as a terminal's foreground job: the arguments, process, gate, state."""
    gate, state = tmp_path / "gate", tmp_path / "state"
    gate.mkdir()
    args = [
        "run",
        GATED,
        "--input",
        str(paused_numbers),
        "--checkpoint",
        str(state),
        "--json",
        "--no-progress",
    ]
    return args, _start(args, _env(MB_TEST_GATE=str(gate)), start_new_session=True), gate, state


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_to_the_process_group_mid_run_stops_gracefully_and_resumes_exact(
    signum: int, code: int, paused_numbers: Path, tmp_path: Path
) -> None:
    args, proc, gate, state = _start_in_own_session(paused_numbers, tmp_path)
    try:
        worker = _paused_worker(gate, proc)
        os.killpg(proc.pid, signum)  # the parent and its workers alike
        _wait_for(lambda: "stopped reading" in _peek(proc), "the stop message", proc)
        # The worker ignored the signal: it leaves the stop to its parent and finishes its batch.
        assert psutil.Process(worker).status() != psutil.STATUS_ZOMBIE
        (gate / "release").write_text("")
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    cp = _checkpoint(state)
    assert cp["finished"] is False and json.loads(stdout) == cp["value"]
    resumed = mb(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == TOTAL


def test_a_signal_to_the_process_group_while_workers_start_stops_gracefully(
    paused_numbers: Path, tmp_path: Path
) -> None:
    args, proc, gate, _ = _start_in_own_session(paused_numbers, tmp_path)
    try:
        # As soon as the first worker process exists (it is still starting), signal the group.
        _wait_for(lambda: bool(psutil.Process(proc.pid).children()), "a worker process to exist", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        (gate / "release").write_text("")
        _, stderr = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "ExecutorUnavailable" not in stderr
    resumed = mb(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == TOTAL


JOB_WITH_CLASS = """
from dataclasses import dataclass
import microbatch as mb

@dataclass
class Totals:
    count: int
    total: int

def parse(lines):
    return Totals(len(lines), sum(map(int, lines)))

def add(acc, totals):
    return acc + totals.total

pipeline = mb.Pipeline(parse, aggregate=mb.Reduce(add, 0), max_size=100, workers=2)
"""


def test_a_job_file_class_as_result_works_as_with_a_module(numbers: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "classjob.py").write_text(JOB_WITH_CLASS)
    as_file = mb("run", f"{jobs / 'classjob.py'}:pipeline", "--input", str(numbers), "--json")
    assert as_file.returncode == 0, as_file.stderr
    assert json.loads(as_file.stdout) == TOTAL
    env = _env(PYTHONPATH=os.pathsep.join([str(jobs), *sys.path]))
    as_module = mb("run", "classjob:pipeline", "--input", str(numbers), "--json", env=env)
    assert as_module.returncode == 0, as_module.stderr
    assert json.loads(as_module.stdout) == TOTAL


def test_a_tcp_input_on_every_interface_is_warned_about() -> None:
    import logging

    from microbatch.cli.inputs import _parse_input

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("microbatch")
    logger.addHandler(handler)
    try:
        assert _parse_input("tcp://0:9000", follow=False).host == "0"
        assert _parse_input("tcp://[::]:9000", follow=False).host == "::"
        assert _parse_input("tcp://127.0.0.1:9000", follow=False).host == "127.0.0.1"
    finally:
        logger.removeHandler(handler)
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("every network interface" in w for w in warned)


@pytest.mark.anyio
async def test_an_ipv6_listener_is_named_as_in_a_url(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import microbatch as mb

    caplog.set_level(logging.INFO, logger="microbatch")
    try:
        async with mb.tcp_lines(0, host="::1") as server:
            port = server.port
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert f"listening on tcp://[::1]:{port}" in caplog.text


def test_split_size_reaches_the_pipeline_and_zero_turns_splits_off(numbers: Path) -> None:
    from microbatch.cli.main import build_parser
    from microbatch.cli.run import _overrides

    def split_size(*argv: str) -> object:
        args = build_parser().parse_args(["run", GATED, "--input", str(numbers), *argv])
        return _overrides(args).get("split_size", "unset")

    assert split_size() == "unset"
    assert split_size("--split-size", "4096") == 4096
    assert split_size("--split-size", "0") is None
    for size in ("0", "100"):  # no splits, and splits of 100 bytes over the 3,890-byte file
        result = mb("run", GATED, "--input", str(numbers), "--split-size", size, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == TOTAL
