"""What the ``microbatch`` command prints: values a shell can read, a progress line that fits the
terminal, log lines without a doubled prefix, and the options that pass settings through."""

from __future__ import annotations

import logging
import os
import re
import select
import shlex
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from microbatch.cli import progress
from microbatch.cli.inputs import _Input, _make_source
from microbatch.cli.logs import _Formatter
from microbatch.cli.main import build_parser
from microbatch.cli.run import _overrides

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"
GATED = str(JOBS / "gated_sum.py") + ":pipeline"
WAIT = 30.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(JOBS), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("MB_TEST_GATE", None)
    env.update(extra)
    return env


@pytest.fixture
def big_numbers(tmp_path: Path) -> Path:
    """1..100000, whose sum 5000050000 needs thousands separators to be read by people."""
    path = tmp_path / "numbers.txt"
    path.write_text("".join(f"{i}\n" for i in range(1, 100_001)))
    return path


# --- values on stdout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["readable", "json"])
def test_command_substitution_gives_a_plain_number(big_numbers: Path, extra: list[str]) -> None:
    command = [sys.executable, "-m", "microbatch", "run", GATED, "--input", str(big_numbers), *extra]
    script = f'x=$({shlex.join(command)} --max-size 10000) && echo "$((x + 1))"'
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=_env(), timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "5000050001\n"  # the shell did arithmetic with the value


def test_human_adds_thousands_separators(big_numbers: Path) -> None:
    command = [sys.executable, "-m", "microbatch", "run", GATED, "-i", str(big_numbers)]
    result = subprocess.run(
        [*command, "--human", "--max-size", "9999"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "5,000,050,000\n"


def test_format_value_plain_and_human() -> None:
    assert progress.format_value(5000050000) == "5000050000"
    assert progress.format_value(5000050000, human=True) == "5,000,050,000"
    assert progress.format_value(2.5) == "2.5"
    assert progress.format_value(True) == "True"
    pairs = [("the", 12345), ("a", 7)]
    assert progress.format_value(pairs) == "12345  the\n    7  a"
    assert progress.format_value(pairs, human=True) == "12,345  the\n     7  a"
    assert progress.format_value({"x": 1234567}) == "x  1234567"
    assert progress.format_value({"x": 1234567}, human=True) == "x  1,234,567"


# --- the progress line -----------------------------------------------------------------------------------


@dataclass
class _Stats:
    records: int = 0
    batches: int = 0
    retries: int = 0
    dead_letters: int = 0
    queue_depth: int = 0
    position: Any = None
    elapsed: float = 0.0
    records_per_second: float = 0.0


def test_progress_text_fits_the_width_and_keeps_the_records() -> None:
    huge = _Stats(
        records=123_456_789_012,
        batches=12_345_678,
        retries=12_345,
        dead_letters=678,
        queue_depth=4,
        position=40 * 2**30,
        elapsed=1234.5,
        records_per_second=98_765_432.0,
    )
    wide = progress.progress_text(huge, total=80 * 2**30, initial=0, byte_positions=True, width=200)
    assert "123,456,789,012 records" in wide and "dead 678" in wide and "40.0 GiB/80.0 GiB" in wide
    assert "eta 20:34" in wide  # half read in 1234.5 s: as long again
    for width in (79, 60, 40, 24):
        line = progress.progress_text(huge, total=80 * 2**30, initial=0, byte_positions=True, width=width)
        assert len(line) <= width, (width, line)
        assert line.startswith("123,456,789,012 records"), line
    # A record count (standard input, TCP) is never shown as bytes.
    counted = progress.progress_text(
        _Stats(records=5000, batches=5, position=5000), total=None, initial=0, byte_positions=False, width=79
    )
    assert "5,000 records" in counted and not re.search(r"\d (B|KiB|MiB)\b", counted), counted


def _run_in_terminal(
    argv: list[str], *, columns: int, stdin_data: bytes | None = None
) -> tuple[subprocess.Popen[bytes], bytes, bytes]:
    """Run the command with stderr on a pseudo-terminal ``columns`` wide; return it, stdout, screen."""
    import fcntl
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = _env(TERM="xterm-256color", COLUMNS=str(columns))
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "microbatch", *argv],
        env=env,
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    screen = b""
    try:
        stdout, _ = proc.communicate(stdin_data, timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # the child has exited: read the terminal until EIO/EOF
            if not select.select([master], [], [], 1.0)[0]:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not data:
                break
            screen += data
    finally:
        proc.kill()
        os.close(master)
    return proc, stdout, screen


def _screen_lines(screen: bytes) -> list[str]:
    return [line for line in re.split(r"[\r\n]", ANSI.sub("", screen.decode())) if line.strip()]


def test_stdin_progress_counts_records_within_80_columns() -> None:
    data = "".join(f"{i}\n" for i in range(1000)).encode()
    proc, stdout, screen = _run_in_terminal(
        ["run", GATED, "--input", "-", "--max-size", "10"], columns=80, stdin_data=data
    )
    assert proc.returncode == 0, screen[-2000:]
    assert stdout == f"{sum(range(1000))}\n".encode()
    lines = _screen_lines(screen)
    assert b"\x1b[" in screen  # the live display was drawn
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    final = [line for line in lines if line.startswith("1,000 records") and "100 batches" in line]
    assert final, lines  # the progress line: records and batches on one row
    assert not any(re.search(r"\d (B|KiB|MiB)\b", line) for line in final), final


def test_file_progress_fits_80_columns(big_numbers: Path) -> None:
    proc, _, screen = _run_in_terminal(
        ["run", GATED, "--input", str(big_numbers), "--max-size", "5000", "--retries", "1"], columns=80
    )
    assert proc.returncode == 0, screen[-2000:]
    lines = _screen_lines(screen)
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    final = [line for line in lines if line.startswith("100,000 records") and "20 batches" in line]
    assert final and "KiB" in final[-1], lines  # a file's progress shows bytes read of its size


# --- logs and options ------------------------------------------------------------------------------------


def test_a_message_naming_microbatch_is_not_prefixed_twice() -> None:
    record = logging.LogRecord(
        "microbatch.checkpoint", logging.WARNING, __file__, 1, "microbatch: skipping %s", ("x",), None
    )
    assert _Formatter().format(record) == "microbatch: warning: skipping x"
    record = logging.LogRecord("microbatch.cli", logging.INFO, __file__, 1, "done: %d", (3,), None)
    assert _Formatter().format(record) == "microbatch: done: 3"


def test_checkpoint_every_reaches_the_pipeline() -> None:
    from microbatch.cli import load_target

    pipeline = load_target(GATED)
    for text, expected in (("2.5", 2.5), ("0", 0.0), ("none", None)):
        args = build_parser().parse_args(["run", GATED, "-i", "x", "--checkpoint-every", text])
        assert pipeline.replace(**_overrides(args)).checkpoint_every == expected
    args = build_parser().parse_args(["run", GATED, "-i", "x"])
    assert "checkpoint_every" not in _overrides(args)  # the pipeline's own setting stays


def test_poll_interval_reaches_the_followed_file(tmp_path: Path) -> None:
    args = build_parser().parse_args(["run", GATED, "-i", "x", "--follow", "--poll-interval", "0.05"])
    source = _make_source(
        _Input("file", path=str(tmp_path / "log")), "utf-8", True, poll_interval=args.poll_interval
    )
    assert source.poll_interval == 0.05
