"""stdin_lines on real pipes, real files and a real child process's standard input."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import microbatch as mb
from microbatch.sources import LineParts, StdinLines, stdin_lines

pytestmark = pytest.mark.anyio


@contextmanager
def _pipe(data: bytes) -> Iterator[int]:
    """The read end of a pipe holding ``data``, its write end closed (the input has ended)."""
    assert len(data) < 60_000, "must fit in the pipe buffer"
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        yield r
    finally:
        os.close(r)


async def _chunks(source: StdinLines[Any]) -> list[list[Any]]:
    return [chunk async for chunk in source.chunks()]


async def test_lines_from_a_pipe_with_terminators_and_a_last_line_without_newline() -> None:
    with _pipe(b"a\r\nb\n\nc") as fd:
        assert [line async for line in stdin_lines(fd=fd)] == ["a", "b", "", "c"]
    with _pipe(b"x\ny\n") as fd:
        assert [line async for line in stdin_lines(fd=fd, encoding=None)] == [b"x", b"y"]


async def test_a_regular_file_as_stdin_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"".join(b"%d\n" % i for i in range(5000)))
    with open(path, "rb") as f:
        lines = [line async for line in stdin_lines(fd=f.fileno(), read_size=1000)]
    assert lines == [str(i) for i in range(5000)]


async def test_strict_decoding_delivers_the_lines_before_the_bad_byte_then_names_its_offset() -> None:
    with _pipe(b"good\nfine\nb\xffd\nafter\n") as fd:
        source = stdin_lines(fd=fd)
        seen: list[str] = []
        with pytest.raises(mb.SourceDecodeError, match="<stdin>: cannot decode byte offset 11") as info:
            async for line in source:
                seen.append(line)
    assert seen == ["good", "fine"]
    assert info.value.offset == 11


async def test_replace_keeps_every_line_of_a_block_with_an_undecodable_byte() -> None:
    with _pipe(b"good\nb\xffd\nafter\n") as fd:
        assert await _chunks(stdin_lines(fd=fd, errors="replace")) == [["good", "b\ufffdd", "after"]]


async def test_max_line_length_names_stdin_and_the_offset_after_earlier_lines() -> None:
    with _pipe(b"ok\n" + b"x" * 50 + b"\nnext\n") as fd:
        seen: list[str] = []
        with pytest.raises(mb.LineTooLong, match="<stdin>: line starting at byte offset 3"):
            async for line in stdin_lines(fd=fd, max_line_length=20):
                seen.append(line)
    assert seen == ["ok"]


async def test_a_real_child_process_stdin_fails_strictly_after_its_good_lines(tmp_path: Path) -> None:
    script = (
        "import anyio, microbatch.sources as s\n"
        "async def main():\n"
        "    async for line in s.stdin_lines():\n"
        "        print(line, flush=True)\n"
        "anyio.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], input=b"1\n2\n\xfe\n3\n", capture_output=True, env=env, timeout=60
    )
    assert done.returncode != 0
    assert done.stdout.split() == [b"1", b"2"]
    assert b"<stdin>: cannot decode byte offset 4" in done.stderr


async def test_protocol_description_and_resume_by_skipping_the_counted_bytes() -> None:
    source = stdin_lines()
    assert isinstance(source, LineParts)
    assert (source.where, source.encoding, source.errors) == ("<stdin>", "utf-8", "strict")
    assert source.describe() == "stdin"
    assert source.resume(None) is source and source.resume(0) is source
    with _pipe(b"aa\nbb\ncc\n") as fd:
        resumed = stdin_lines(fd=fd).resume(3)
        parts = [part async for part in resumed.parts()]
    # Positions stay offsets of the whole input, so later checkpoints count from its start.
    assert [(head + data[:end], start) for head, data, end, start in parts] == [(b"bb\ncc\n", 3)]
    with _pipe(b"aa\nbb\n") as fd:
        assert [line async for line in stdin_lines(fd=fd).resume(6)] == []
    with _pipe(b"aa\nbb\n") as fd, pytest.raises(ValueError, match="not the beginning of a line"):
        await _chunks(stdin_lines(fd=fd).resume(2))
    with _pipe(b"aa\n") as fd, pytest.raises(ValueError, match="past the end of the input"):
        await _chunks(stdin_lines(fd=fd).resume(10))


async def test_resume_at_the_end_of_one_read_goes_on_with_the_next() -> None:
    with _pipe(b"aa\nbb\ncc\n") as fd:
        resumed = stdin_lines(fd=fd, read_size=3).resume(3)
        assert [line async for line in resumed] == ["bb", "cc"]


def test_invalid_options_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="max_line_length"):
        stdin_lines(max_line_length=0)
    with pytest.raises(ValueError, match="read_size"):
        stdin_lines(read_size=0)
    with pytest.raises(ValueError, match="ASCII-compatible"):
        stdin_lines(encoding="utf-16")
    with pytest.raises(LookupError, match="errors='bogus'"):
        stdin_lines(errors="bogus")
    with pytest.raises(TypeError, match="position"):
        stdin_lines().resume("3")


async def test_dev_null_and_other_devices_are_read_in_a_thread_not_polled() -> None:
    # epoll refuses /dev/null (EPERM): reading it as a pipe failed with PermissionError.
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert [line async for line in stdin_lines(fd=fd)] == []
    finally:
        os.close(fd)
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        with pytest.raises(mb.LineTooLong):  # zeros without a newline: the limit, not a hang
            async for _ in stdin_lines(fd=fd, max_line_length=100_000):
                pass
    finally:
        os.close(fd)


async def test_a_closed_standard_input_is_a_source_error_not_an_attribute_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when started with '<&-'
    with pytest.raises(mb.SourceError, match="standard input is closed"):
        await mb.Pipeline(len, aggregate=mb.Sum(), executor="inline").run(stdin_lines())


def test_a_child_started_with_stdin_closed_gets_the_source_error() -> None:
    code = (
        "import anyio, microbatch as mb\n"
        "from microbatch.sources import stdin_lines\n"
        "try:\n"
        "    anyio.run(mb.Pipeline(len, aggregate=mb.Sum(), executor='inline').run, stdin_lines())\n"
        "except mb.SourceError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        ["bash", "-c", 'exec "$0" -c "$1" <&-', sys.executable, code],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert "standard input is closed" in out.stdout, out.stderr
