"""Clear errors of the command and of the sources under it, from real redirections: standard input
from ``/dev/null`` (an empty input), closed (``<&-``), dead letters written to a full device
(``/dev/full``, which fails every write with ENOSPC as a full disk does)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from test_cli_edges import EDGES, lines, run

import microbatch as mb


def test_standard_input_from_dev_null_is_an_empty_input() -> None:
    with open("/dev/null") as devnull:
        result = run("run", EDGES + "total", "--input", "-", stdin=devnull)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0\n" and "done: 0 records" in result.stderr


def test_a_closed_standard_input_is_a_usage_error() -> None:
    result = run(shell=f'exec "$MB" run {EDGES}total --input - <&-')
    assert result.returncode == 2, result.stderr
    assert "standard input is closed" in result.stderr and "Traceback" not in result.stderr


def test_a_full_device_for_the_dead_letters_is_an_error_naming_the_file(tmp_path: Path) -> None:
    src = lines(tmp_path / "bad.txt", ["1", "x", "2"])
    result = run("run", EDGES + "total", "--input", str(src), "--retries", "0", "--dead-letter", "/dev/full")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "dead-letter file /dev/full" in error and "No space left on device" in error, error
    assert "Traceback" not in result.stderr


@pytest.mark.anyio
async def test_a_full_device_for_the_dead_letters_raises_an_os_error_naming_it(tmp_path: Path) -> None:
    src = lines(tmp_path / "bad.txt", ["1", "x", "2"])
    pipeline = mb.Pipeline(int_sum, aggregate=mb.Sum(), executor="inline", retries=0, dead_letter="/dev/full")
    with pytest.raises(OSError) as info:
        await pipeline.run(mb.read_lines(src))
    assert info.value.errno == errno.ENOSPC
    assert "dead-letter file /dev/full" in str(info.value) and "batch 0" in str(info.value)


def int_sum(records: list[str]) -> int:
    return sum(int(x) for x in records)
