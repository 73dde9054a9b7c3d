"""The command with many files (a quoted glob) and a NATS stream as --input, and --stop-when-idle."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _nats import NatsServer, publish, running_server

ROOT = Path(__file__).resolve().parent.parent
GATED = str(Path(__file__).resolve().parent / "jobs" / "gated_sum.py") + ":pipeline"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_server(tmp_path / "jetstream") as server:
        yield server


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "microbatch", "run", GATED, *args, "--workers", "1", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def lines(lo: int, hi: int) -> bytes:
    return "".join(f"{i}\n" for i in range(lo, hi)).encode()


def test_a_quoted_glob_reads_every_matching_file(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(lines(0, 100))
    (tmp_path / "b.log.gz").write_bytes(gzip.compress(lines(100, 200)))
    (tmp_path / "c.txt").write_bytes(lines(1000, 1001))  # does not match
    out = run("--input", str(tmp_path / "*.log*"), "--checkpoint", str(tmp_path / "state"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(sum(range(200)))


def test_a_followed_glob_stops_when_idle_and_the_next_run_reads_on(tmp_path: Path) -> None:
    logs, state = tmp_path / "logs", str(tmp_path / "state")
    logs.mkdir()
    (logs / "1.log").write_bytes(lines(0, 100))
    args = ["--input", str(logs / "*.log"), "--follow", "--stop-when-idle", "0.3s", "--checkpoint", state]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == str(sum(range(100)))
    (logs / "2.log").write_bytes(lines(100, 150))
    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == str(sum(range(150)))


def test_a_nats_stream_is_followed_until_idle_then_resumed(nats_server: NatsServer, tmp_path: Path) -> None:
    publish(nats_server.url, "EVENTS", [str(i).encode() for i in range(500)], create=True)
    url = f"{nats_server.url}/EVENTS"
    args = ["--input", url, "--stop-when-idle", "0.5", "--checkpoint", str(tmp_path / "state")]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == str(sum(range(500)))
    publish(nats_server.url, "EVENTS", [str(i).encode() for i in range(500, 600)])
    publish(nats_server.url, "EVENTS", [b"1000000"], subject="events.other")
    # Another subject is another input: the checkpoint is refused, naming both.
    second = run("--input", f"{url}/events.a", *args[2:])
    assert second.returncode == 1 and "nats:EVENTS/events.a" in second.stderr
    third = run(*args)
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip().splitlines()[-1] == str(sum(range(600)) + 1_000_000)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "nats://127.0.0.1:4222"], "expected nats://HOST:PORT/STREAM"),
        (["--input", "nats://127.0.0.1:4222/a.b"], "expected nats://HOST:PORT/STREAM"),
        (["--input", "{tmp}/*.nothing"], "no file matches"),
        (["--input", "{tmp}/*.log", "--stop-when-idle", "1"], "--stop-when-idle ends a run that follows"),
        (["--input", "nats://127.0.0.1:4222/S", "--stop-when-idle", "-1"], "--stop-when-idle: expected"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "a.log").write_bytes(lines(0, 10))
    out = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
