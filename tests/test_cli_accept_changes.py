"""``microbatch run --accept-changes``: a changed job is refused naming the change; the switch and
``--fresh`` both get past the refusal. Real job files, a real child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT = 60.0  # upper bound for the child; never reached when things work

JOB = '''
import microbatch as mb


def total(lines):
    return {factor} * sum(int(x) for x in lines)


pipeline = mb.Pipeline(total, aggregate=mb.Sum(), max_size=100, executor="inline")
'''


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "microbatch", "run", *args, "--no-progress", "--json"],
        capture_output=True, text=True, env=env, timeout=WAIT,
    )


def test_a_changed_job_is_refused_unless_accepted_or_fresh(tmp_path: Path) -> None:
    job, numbers, state = tmp_path / "job.py", tmp_path / "numbers.txt", tmp_path / "state"
    numbers.write_text("".join(f"{i}\n" for i in range(1000)))
    job.write_text(JOB.format(factor=1))
    target = f"{job}:pipeline"
    first = _run(target, "--input", str(numbers), "--checkpoint", str(state))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1]) == sum(range(1000))

    job.write_text(JOB.format(factor=2))  # fn's body changed
    refused = _run(target, "--input", str(numbers), "--checkpoint", str(state))
    assert refused.returncode == 1
    assert "fn's code changed" in refused.stderr and "--fresh" in refused.stderr

    # Accepted: the finished run's checkpoint stands, and it is not refused any more.
    accepted = _run(target, "--input", str(numbers), "--checkpoint", str(state), "--accept-changes")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout.splitlines()[-1]) == sum(range(1000))

    job.write_text(JOB.format(factor=3))
    fresh = _run(target, "--input", str(numbers), "--checkpoint", str(state), "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout.splitlines()[-1]) == 3 * sum(range(1000))


def test_accept_changes_needs_a_checkpoint(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("1\n")
    job = tmp_path / "job.py"
    job.write_text(JOB.format(factor=1))
    done = _run(f"{job}:pipeline", "--input", str(numbers), "--accept-changes")
    assert done.returncode == 2
    assert "--accept-changes resumes a changed pipeline: it needs --checkpoint DIR" in done.stderr
