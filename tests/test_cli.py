"""The ``microbatch`` command, run for real in subprocesses (``python -m microbatch``).

Signals land while a batch is in flight: the job ``tests/jobs/gated_sum.py`` pauses on a ``pause``
line until the test creates a ``release`` file, and announces the pause with a marker file holding
the worker's pid. The child resets SIGINT to its default, because a background job of a
non-interactive shell inherits it ignored (and the command keeps an ignored signal ignored).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"
GATED = str(JOBS / "gated_sum.py") + ":pipeline"
WAIT = 30.0  # upper bound for any wait on the child; never reached when things work

NUMBERS = [str(i) for i in range(1000)]
TOTAL = sum(range(1000))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(JOBS), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("MB_TEST_GATE", None)
    env.update(extra)
    return env


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def mb(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microbatch", *args],
        capture_output=True,
        text=True,
        env=env or _env(),
        input=stdin,
        timeout=WAIT,
        preexec_fn=_reset_signals,
    )


def _wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the command exited ({proc.returncode}) before {what}: {proc.stderr.read()}"
            )  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- runs ------------------------------------------------------------------------------------------------


def test_job_file_target_prints_the_value(numbers: Path) -> None:
    result = mb("run", GATED, "--input", str(numbers), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{TOTAL}\n"  # as Python prints it: the shell reads it as a number
    assert "done: 1,000 records in 100 batches" in result.stderr


def test_module_target_with_json(tmp_path: Path) -> None:
    text = tmp_path / "words.txt"
    text.write_text("a b c\na a b\nd a\n")
    result = mb("run", "words:pipeline", "--input", str(text), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [["a", 4], ["b", 2], ["c", 1]]
    assert result.stdout.count("\n") == 1


def test_readme_wordcount_example() -> None:
    readable = mb("run", "examples/wordcount.py:pipeline", "--input", "examples/data/sample.txt")
    assert readable.returncode == 0, readable.stderr
    first = readable.stdout.splitlines()[0].split()
    assert (
        len(readable.stdout.splitlines()) == 10 and first[1] == "the" and int(first[0].replace(",", "")) > 0
    )
    as_json = mb("run", "examples/wordcount.py:pipeline", "--input", "examples/data/sample.txt", "--json")
    assert as_json.returncode == 0, as_json.stderr
    top = json.loads(as_json.stdout)
    assert [[w, str(n)] for w, n in top] == [
        [line.split()[1], line.split()[0]] for line in readable.stdout.splitlines()
    ]


def test_stdin_input_and_overrides(tmp_path: Path) -> None:
    result = mb(
        "run", GATED, "--input", "-", "--max-size", "7", "--workers", "2", "--json", stdin="1\n2\n3\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "6\n"
    assert "in 1 batch," in result.stderr


def test_pipeline_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1\nnot a number\n")
    dead = tmp_path / "dead.jsonl"
    # Failing records go to the dead-letter file: the run succeeds and says so.
    ok = mb("run", GATED, "--input", str(bad), "--retries", "0", "--dead-letter", str(dead))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "1\n"
    assert "1 records failed" in ok.stderr and "not a number" in dead.read_text()
    # An import-time failure of the job itself is the job's error, exit 1, in one line.
    broken = mb("run", str(JOBS / "broken_import.py") + ":pipeline", "--input", str(bad))
    assert broken.returncode == 1
    assert broken.stderr.strip().splitlines() == [
        "microbatch: error: RuntimeError: this job file is broken on purpose (-v shows the traceback)"
    ]
    verbose = mb("run", str(JOBS / "broken_import.py") + ":pipeline", "--input", str(bad), "-v")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


# --- usage errors ----------------------------------------------------------------------------------------

USAGE_ERRORS: list[tuple[list[str], str]] = [
    ([], "the following arguments are required: COMMAND"),
    (["run", GATED], "required: -i/--input"),
    (["frobnicate"], "invalid choice"),
    (
        ["run", GATED, "--input", "{numbers}", "--workers", "0"],
        "--workers: expected a whole number >= 1, got '0'",
    ),
    (["run", GATED, "--input", "{numbers}", "--max-size", "x"], "--max-size: expected a whole number >= 1"),
    (["run", GATED, "--input", "{numbers}", "--max-wait", "-1"], "--max-wait: expected seconds >= 0"),
    (["run", GATED, "--input", "{numbers}", "--timeout", "0"], "--timeout: expected seconds > 0"),
    (["run", GATED, "--input", "{numbers}", "--retries", "-1"], "--retries: expected a whole number >= 0"),
    (["run", GATED, "--input", "{numbers}", "--queue-size", "0"], "--queue-size"),
    (["run", GATED, "--input", "{numbers}", "--encoding", "klingon"], "unknown encoding 'klingon'"),
    (["run", GATED, "--input", "{numbers}", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", GATED, "--input", "{tmp}/missing.txt"], "no such file"),
    (["run", GATED, "--input", "{tmp}"], "is a folder"),
    (["run", GATED, "--input", "tcp://127.0.0.1:99999"], "tcp://HOST:PORT with PORT 0..65535"),
    (["run", GATED, "--input", "http://example.com/x"], "unknown scheme"),
    (["run", GATED, "--input", "-", "--follow"], "--follow needs a file"),
    (["run", GATED, "--input", "{numbers}", "--poll-interval", "1"], "--poll-interval sets how often"),
    (
        ["run", GATED, "--input", "{numbers}", "--follow", "--poll-interval", "none"],
        "--poll-interval: expected seconds > 0, got 'none'",
    ),
    (["run", GATED, "--input", "{numbers}", "--checkpoint-every", "-1"], "--checkpoint-every: expected"),
    (
        ["run", GATED, "--input", "{numbers}", "--fresh"],
        "--fresh discards a checkpoint: it needs --checkpoint",
    ),
    (["run", GATED, "--input", "{numbers}", "--checkpoint", "{numbers}"], "is a file; it must be a folder"),
    (["run", GATED, "--input", "{numbers}", "--dead-letter", "{tmp}/no/such/dl.jsonl"], "does not exist"),
    (
        ["run", "no_colon", "--input", "{numbers}"],
        "TARGET must be path/to/file.py:NAME or package.module:NAME",
    ),
    (
        ["run", "{tmp}/missing.py:pipeline", "--input", "{numbers}"],
        "job file '{tmp}/missing.py' does not exist",
    ),
    (["run", "no_such_module_xyz:pipeline", "--input", "{numbers}"], "no module named 'no_such_module_xyz'"),
    (
        ["run", "gated_sum:pipelin", "--input", "{numbers}"],
        "gated_sum has no attribute 'pipelin' (pipelines there: pipeline)",
    ),
    (
        ["run", "gated_sum:not_a_pipeline", "--input", "{numbers}"],
        "gated_sum:not_a_pipeline is a int (42), not a microbatch.Pipeline",
    ),
    (
        ["run", "gated_sum:sum_lines", "--input", "{numbers}"],
        "is the function sum_lines(), not a microbatch.Pipeline",
    ),
    (["inspect", "{tmp}/nothing-here"], "does not exist"),
]


@pytest.mark.parametrize(
    ("argv", "message"), USAGE_ERRORS, ids=[" ".join(a[:1] + a[2:4]) or "none" for a, _ in USAGE_ERRORS]
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], message: str, numbers: Path, tmp_path: Path
) -> None:
    def fill(s: str) -> str:
        return s.replace("{numbers}", str(numbers)).replace("{tmp}", str(tmp_path))

    result = mb(*[fill(a) for a in argv])
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("microbatch"), lines
    assert fill(message) in lines[0]


# --- signals ---------------------------------------------------------------------------------------------


def _start(args: Sequence[str], env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "microbatch", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_reset_signals,
        **kwargs,
    )


def _paused_worker(gate: Path, proc: subprocess.Popen[str]) -> int:
    _wait_for(lambda: any(gate.glob("paused-*")), "a worker to pause", proc)
    (marker,) = gate.glob("paused-*")
    return int(marker.name.removeprefix("paused-"))


def _assert_gone(pids: set[int]) -> None:
    for pid in pids:
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        assert not alive, f"worker process {pid} outlived the command"


def _checkpoint(folder: Path) -> dict[str, object]:
    result = mb("inspect", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _start_paused(
    paused_numbers: Path, tmp_path: Path
) -> tuple[list[str], subprocess.Popen[str], Path, Path, set[int]]:
    """Start a checkpointed run whose batch 50 pauses in its worker; return the command's
    arguments, the process, the gate and checkpoint folders, and the pids of the run's tree."""
    gate, state = tmp_path / "gate", tmp_path / "state"
    gate.mkdir()
    args = ["run", GATED, "--input", str(paused_numbers), "--checkpoint", str(state)]
    args += ["--json", "--no-progress"]
    proc = _start(args, _env(MB_TEST_GATE=str(gate)))
    try:
        worker = _paused_worker(gate, proc)
        workers = {worker} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    except BaseException:
        proc.kill()
        raise
    return args, proc, gate, state, workers


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_first_signal_finishes_in_flight_batches_then_resume_is_exact(
    signum: int, code: int, paused_numbers: Path, tmp_path: Path
) -> None:
    args, proc, gate, state, workers = _start_paused(paused_numbers, tmp_path)
    try:
        proc.send_signal(signum)
        _wait_for(lambda: proc.poll() is None and "stopped reading" in _peek(proc), "the stop message", proc)
        (gate / "release").write_text("")  # the batch in flight may now finish
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    _assert_gone(workers)
    cp = _checkpoint(state)
    assert cp["finished"] is False
    # Batch 50 (the paused one) was in flight: it finished and was folded before the final checkpoint.
    assert isinstance(cp["batches"], int) and 51 <= cp["batches"] < 101
    assert cp["value"] == sum(range(int(cp["records"]) - 1)), cp  # type: ignore[call-overload]
    assert json.loads(stdout) == cp["value"]  # an interrupted run prints what it folded
    resumed = mb(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == TOTAL
    assert _checkpoint(state)["finished"] is True


def _peek(proc: subprocess.Popen[str]) -> str:
    """What the child wrote to stderr so far (non-blocking), kept for later reads."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    chunks = getattr(proc, "_peeked", "")
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 65536)
        if not data:
            break
        chunks += data.decode()
    proc._peeked = chunks  # type: ignore[attr-defined]
    return chunks


def test_second_signal_stops_at_once_and_leaves_no_worker(paused_numbers: Path, tmp_path: Path) -> None:
    args, proc, _gate, state, workers = _start_paused(paused_numbers, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: "stopped reading" in _peek(proc), "the stop message", proc)
        proc.send_signal(signal.SIGINT)  # the worker is still paused: it must be killed
        proc.wait(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 143, _peek(proc)
    assert "second SIGINT" in _peek(proc)
    _assert_gone(workers)
    cp = _checkpoint(state)
    # Results that reached the parent but were not folded yet (the folder waits for each batch's
    # checkpoint) are dropped when the second signal cuts the run short; what was folded is a
    # prefix, recorded exactly, and never includes the paused batch 50.
    assert cp["finished"] is False
    assert cp["batches"] <= 50
    assert cp["records"] == 10 * cp["batches"]
    assert cp["value"] == sum(range(cp["records"]))
    resumed = mb(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == TOTAL


# --- inspect ---------------------------------------------------------------------------------------------


def test_inspect_text_and_json(numbers: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = mb("run", GATED, "--input", str(numbers), "--checkpoint", str(state))
    assert done.returncode == 0, done.stderr
    info = _checkpoint(state)
    assert info["finished"] is True
    assert (info["batches"], info["records"], info["value"], info["dead_letters"]) == (100, 1000, TOTAL, 0)
    assert info["position"] == numbers.stat().st_size
    assert isinstance(info["created"], float) and abs(info["created"] - time.time()) < 600
    text = mb("inspect", str(state))
    assert text.returncode == 0, text.stderr
    fields = dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.stdout.splitlines() if "  " in line
    )
    assert fields["batches"] == "100" and fields["records"] == "1,000" and fields["finished"] == "yes"
    assert fields["value"] == f"{TOTAL:,}" and fields["dead letters"] == "0"
    assert fields["position"] == f"{numbers.stat().st_size:,}"
    # Rerunning a finished checkpoint folds nothing more and prints the same value.
    again = mb("run", GATED, "--input", str(numbers), "--checkpoint", str(state), "--json")
    assert again.returncode == 0 and json.loads(again.stdout) == TOTAL
    assert "already finished" in again.stderr


# --- progress in a terminal ------------------------------------------------------------------------------


def test_progress_updates_in_a_terminal(paused_numbers: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = _env(MB_TEST_GATE=str(gate), TERM="xterm-256color", COLUMNS="200")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "microbatch", "run", GATED, "--input", str(paused_numbers)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=slave,
        preexec_fn=_reset_signals,
    )
    os.close(slave)
    screen = b""

    def read_some() -> None:
        nonlocal screen
        if select.select([master], [], [], 0.05)[0]:
            try:
                screen += os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                pass

    def counts() -> set[str]:
        return set(re.findall(r"([\d,]+) records", re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", screen).decode()))

    try:
        # While batch 50 is paused, the display shows the 500 records folded before it.
        deadline = time.monotonic() + WAIT
        while "500" not in counts() and time.monotonic() < deadline:
            read_some()
        assert "500" in counts(), screen[-2000:]
        (gate / "release").write_text("")
        stdout, _ = proc.communicate(timeout=WAIT)
        deadline = time.monotonic() + 5
        while b"done:" not in screen and time.monotonic() < deadline:
            read_some()
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 0
    assert stdout == f"{TOTAL}\n".encode()  # stdout holds the result only, never the display
    assert {"500", "1,001"} <= counts(), counts()
    assert b"\x1b[" in screen  # a live display redraws with terminal control sequences


def test_tcp_input_until_interrupted(tmp_path: Path) -> None:
    import socket

    from microbatch.checkpoints.targets import open_store

    state = tmp_path / "state"
    args = [
        "run",
        GATED,
        "--input",
        "tcp://127.0.0.1:0",
        "--checkpoint",
        str(state),
        "--json",
        "--max-wait",
        "0",
    ]
    proc = _start(args, _env())
    try:
        _wait_for(lambda: "listening on" in _peek(proc), "the server to listen", proc)
        listening = r"listening on (?:tcp://)?127\.0\.0\.1:(\d+)"
        port = int(re.search(listening, _peek(proc)).group(1))  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"1\n2\n3\n")

        def folded() -> bool:
            store = open_store(state)
            try:
                cp = store.load()
            finally:
                store.close()
            return cp is not None and cp.records == 3

        _wait_for(lambda: state.exists() and folded(), "the lines to be folded", proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert json.loads(stdout) == 6
    everything = getattr(proc, "_peeked", "") + stderr
    assert everything.count("listening on") == 1, everything  # each message is logged once


def test_checkpoint_of_another_pipeline_is_a_one_line_error(numbers: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert mb("run", GATED, "--input", str(numbers), "--checkpoint", str(state)).returncode == 0
    other = mb("run", "words:pipeline", "--input", str(numbers), "--checkpoint", str(state))
    assert other.returncode == 1
    (line,) = other.stderr.strip().splitlines()
    assert line.startswith("microbatch: error: ") and str(state) in line, line


def test_stdin_lines_keep_the_line_core_limits_and_endings() -> None:
    examples = Path(__file__).parent.parent / "examples"

    def run(job: str, data: bytes, *options: str) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, "-m", "microbatch", "run", f"{examples / job}:pipeline", "--input", "-"]
        return subprocess.run(
            [*command, "--no-progress", *options], input=data, capture_output=True, timeout=60
        )

    crlf = run("wordcount.py", b"a b\r\nb c\nlast", "--json")
    assert crlf.returncode == 0, crlf.stderr
    last = crlf.stdout.decode().strip().splitlines()[-1]
    assert json.loads(last) == [["b", 2], ["a", 1], ["c", 1], ["last", 1]]
    too_long = run("sum_integers.py", b"1\n" + b"9" * (2 << 20) + b"\n")
    assert too_long.returncode == 1
    message = too_long.stderr.decode()
    assert "<stdin>: line starting at byte offset 2 is longer than max_line_length" in message
