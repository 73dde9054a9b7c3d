"""read_lines on real files, and the pure line-block core it and the workers share."""

from __future__ import annotations

import itertools
import os
import sys
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import microbatch as mb
from microbatch._core.lines import (
    LineBlock,
    LineSplitter,
    cut_lines,
    decode_lines,
    decode_parts,
    find_long_line,
)
from microbatch.sources import LineParts, LineSource


def _write(tmp_path: Path, data: bytes, name: str = "in.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def _lines(source: Any) -> list[Any]:
    return [line async for line in source]


def _block(part: tuple[bytes, bytes, int, int]) -> LineBlock:
    """The lines of one read of a line source, joined, with their byte positions."""
    head, data, end, start = part
    lines = head + data[:end]
    count = lines.count(b"\n") + (not lines.endswith(b"\n"))
    return LineBlock(lines, count, start, start + len(lines))


async def _blocks(source: LineSource[Any]) -> list[LineBlock]:
    return [_block(part) async for part in source.parts()]


# -- pure core -------------------------------------------------------------------------------------


def test_decode_lines_terminators_and_bytes() -> None:
    data = b"a\nb\r\nc\rd\n\ne"
    assert decode_lines(data, encoding="utf-8", errors="strict", where="x", start=0) == [
        "a",
        "b",
        "c\rd",
        "",
        "e",
    ]
    assert decode_lines(data, encoding=None, errors="strict", where="x", start=0) == [
        b"a",
        b"b",
        b"c\rd",
        b"",
        b"e",
    ]
    assert decode_lines(b"", encoding="utf-8", errors="strict", where="x", start=0) == []
    assert decode_lines(b"\n", encoding="utf-8", errors="strict", where="x", start=0) == [""]
    # a \r at the very end without \n is not a terminator
    assert decode_lines(b"a\r", encoding=None, errors="strict", where="x", start=0) == [b"a\r"]


def test_decode_lines_error_names_where_and_absolute_offset() -> None:
    with pytest.raises(mb.SourceDecodeError) as info:
        decode_lines(b"ok\nb\xffad\n", encoding="utf-8", errors="strict", where="f.txt", start=100)
    assert info.value.offset == 104
    assert info.value.where == "f.txt"
    assert "f.txt" in str(info.value) and "104" in str(info.value)
    assert decode_lines(b"b\xff\n", encoding="utf-8", errors="replace", where="f", start=0) == ["b\ufffd"]


def test_cut_lines_edges() -> None:
    block = LineBlock(b"a\nbb\nccc", 3, 10, 18)
    head, tail = cut_lines(block, 0)
    assert (head.data, head.count, head.start, head.end) == (b"", 0, 10, 10)
    assert tail is block
    head, tail = cut_lines(block, 3)
    assert head is block and (tail.count, tail.start, tail.end) == (0, 18, 18)
    head, tail = cut_lines(block, 2)
    assert head == LineBlock(b"a\nbb\n", 2, 10, 15)
    assert tail == LineBlock(b"ccc", 1, 15, 18)
    with pytest.raises(ValueError, match=r"block\.count=3"):
        cut_lines(block, 4)
    with pytest.raises(ValueError, match="start \\+ len"):
        LineBlock(b"ab", 1, 0, 5)


_line = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


@st.composite
def _line_data(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    lines = draw(st.lists(_line, min_size=1, max_size=60))
    crlf = draw(st.lists(st.booleans(), min_size=len(lines), max_size=len(lines)))
    data = b"".join(line + (b"\r\n" if c else b"\n") for line, c in zip(lines, crlf, strict=True))
    if draw(st.booleans()) and lines[-1]:
        data = data[: -2 if crlf[-1] else -1]  # last line without a terminator
    return lines, data


@settings(max_examples=200, deadline=None)
@given(_line_data(), st.integers(min_value=0, max_value=10**6))
def test_decode_and_cut_split_at_line_boundaries(case: tuple[list[bytes], bytes], start: int) -> None:
    lines, data = case
    assert decode_lines(data, encoding=None, errors="strict", where="p", start=start) == lines
    text = [line.decode("latin-1") for line in lines]
    assert decode_lines(data, encoding="latin-1", errors="strict", where="p", start=start) == text
    block = LineBlock(data, len(lines), start, start + len(data))
    for n in range(len(lines) + 1):
        head, tail = cut_lines(block, n)
        assert head.data + tail.data == data
        assert (head.count, tail.count) == (n, len(lines) - n)
        assert head.start == start and head.end == tail.start and tail.end == block.end
        assert decode_lines(head.data, encoding=None, errors="strict", where="p", start=0) == lines[:n]
        assert decode_lines(tail.data, encoding=None, errors="strict", where="p", start=0) == lines[n:]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=3000), min_size=20, max_size=300),
    st.data(),
)
def test_cut_lines_large_uneven_blocks(lengths: list[int], data: st.DataObject) -> None:
    # Long uneven lines exercise the interpolating search, not only the final find() walk.
    lines = [b"x" * n for n in lengths]
    raw = b"\n".join(lines) + b"\n"
    block = LineBlock(raw, len(lines), 0, len(raw))
    n = data.draw(st.integers(min_value=0, max_value=len(lines)))
    head, tail = cut_lines(block, n)
    assert head.data == b"".join(line + b"\n" for line in lines[:n])
    assert tail.count == len(lines) - n


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=30), max_size=30),
    st.integers(min_value=1, max_value=25),
    st.integers(min_value=0, max_value=30),
)
def test_find_long_line_matches_a_line_by_line_scan(lengths: list[int], limit: int, carried: int) -> None:
    data = b"\n".join(b"x" * n for n in lengths)
    carried = min(carried, limit)  # a carried part longer than the limit was already refused
    expected = None
    pos = -carried
    for i, n in enumerate(lengths):
        full = n + (carried if i == 0 else 0)
        if full > limit:
            expected = pos
            break
        pos += full + 1
    assert find_long_line(data, limit, carried) == expected


@settings(max_examples=150, deadline=None)
@given(_line_data(), st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40))
def test_splitter_reassembles_any_chunking(case: tuple[list[bytes], bytes], cuts: list[int]) -> None:
    _, data = case
    splitter = LineSplitter("p", 7, max_line_length=1000)
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(data):
        size = cuts[i % len(cuts)]
        i += 1
        got = splitter.feed(data[pos : pos + size])
        pos += size
        if got is not None:
            assert got.endswith(b"\n")
            out.append(got)
            assert splitter.position == 7 + len(b"".join(out))
    last = splitter.finish()
    if last is not None:
        out.append(last)
    assert b"".join(out) == data
    assert splitter.position == 7 + len(data)


def test_splitter_reports_long_line_after_the_lines_before_it() -> None:
    splitter = LineSplitter("peer", 100, max_line_length=4)
    assert splitter.feed(b"ab\ncd") == b"ab\n"
    assert splitter.pending == 2
    assert splitter.feed(b"\nlonger\nx\n") == b"cd\n"
    with pytest.raises(mb.LineTooLong) as info:
        splitter.raise_pending()
    assert (info.value.where, info.value.offset, info.value.limit) == ("peer", 106, 4)
    with pytest.raises(mb.LineTooLong):
        splitter.feed(b"more\n")
    # the long line is the carried partial line: raised at once, nothing to deliver
    splitter = LineSplitter("peer", 0, max_line_length=4)
    assert splitter.feed(b"a\nxyz") == b"a\n"
    with pytest.raises(mb.LineTooLong) as info:
        splitter.feed(b"zz")
    assert info.value.offset == 2


_PIECES = [b"a", b"\xc3\xa9", b"\xe2\x82\xac", b"\xc3", b"\xff", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf"]


@settings(max_examples=400, deadline=None)
@given(
    head=st.lists(st.sampled_from([p for p in _PIECES if b"\n" not in p]), max_size=4).map(b"".join),
    body=st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join),
    tail=st.lists(st.sampled_from(_PIECES), max_size=6).map(b"".join),
    final=st.booleans(),
    encoding=st.sampled_from([None, "utf-8", "latin-1", "ascii", "utf-8-sig", "cp1252"]),
    errors=st.sampled_from(["strict", "replace", "surrogateescape"]),
)
def test_decode_parts_is_decode_lines_of_the_joined_parts(
    head: bytes, body: bytes, tail: bytes, final: bool, encoding: str | None, errors: str
) -> None:
    # As a line reader gives them: complete lines after a carried partial line, then what follows
    # them in the block (a partial line, or lines after an over-long one); or a last line alone.
    if final:
        head, data, end = b"", body, len(body)
    else:
        body = body.rstrip(b"\n") + b"\n"
        data, end = body + tail, len(body)
    kwargs: dict[str, Any] = {"encoding": encoding, "errors": errors, "where": "w", "start": 5}
    try:
        expected: Any = decode_lines(head + data[:end], **kwargs)
    except mb.SourceDecodeError as exc:
        expected = ("error", exc.offset)
    try:
        got: Any = decode_parts(head, data, end, **kwargs)
    except mb.SourceDecodeError as exc:
        got = ("error", exc.offset)
    assert got == expected


def test_splitter_feed_parts_leaves_the_block_unjoined() -> None:
    splitter = LineSplitter("p", 10, max_line_length=100)
    assert splitter.feed_parts(b"ab") is None
    data = b"c\nd\nef"
    assert splitter.feed_parts(data) == (b"ab", 4)  # lines: b"ab" + data[:4]
    assert splitter.position == 10 + 6
    assert splitter.finish() == b"ef"


# -- files ------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_terminators_crlf_and_last_line_without_newline(tmp_path: Path) -> None:
    path = _write(tmp_path, b"one\ntwo\r\nth\rree\n\nlast")
    assert await _lines(mb.read_lines(path)) == ["one", "two", "th\rree", "", "last"]
    assert await _lines(mb.read_lines(path, encoding=None)) == [b"one", b"two", b"th\rree", b"", b"last"]


@pytest.mark.anyio
async def test_empty_file_and_single_newline(tmp_path: Path) -> None:
    assert await _lines(mb.read_lines(_write(tmp_path, b""))) == []
    assert await _lines(mb.read_lines(_write(tmp_path, b"\n", "nl.txt"))) == [""]
    assert await _blocks(mb.read_lines(_write(tmp_path, b"", "e2.txt"))) == []


@pytest.mark.anyio
async def test_large_file_spanning_many_blocks_has_exact_positions(tmp_path: Path) -> None:
    lines = [f"{i}:" + "é" * (i % 37) for i in range(20_000)]
    raw = ("\n".join(lines) + "\n").encode()
    path = _write(tmp_path, raw)
    source = mb.read_lines(path, block_size=4096)
    assert await _lines(source) == lines
    chunks = [chunk async for chunk in source.chunks()]
    assert len(chunks) > 50 and all(chunks)
    assert [line for chunk in chunks for line in chunk] == lines
    blocks = await _blocks(source)
    assert blocks[0].start == 0 and blocks[-1].end == len(raw)
    for before, after in itertools.pairwise(blocks):
        assert before.end == after.start
    for block in blocks:
        assert block.data == raw[block.start : block.end]
        assert block.count == block.data.count(b"\n") > 0
    assert sum(block.count for block in blocks) == len(lines)


@pytest.mark.anyio
async def test_default_block_size_on_a_multi_mebibyte_file(tmp_path: Path) -> None:
    lines = [f"{i},{i * 7}" for i in range(400_000)]
    path = _write(tmp_path, ("\n".join(lines)).encode())  # no final newline
    blocks = await _blocks(mb.read_lines(path))
    assert len(blocks) >= 3
    assert blocks[-1].end == path.stat().st_size
    assert sum(b.count for b in blocks) == len(lines)
    assert await _lines(mb.read_lines(path)) == lines


@pytest.mark.anyio
async def test_start_offsets_resume_exactly(tmp_path: Path) -> None:
    raw = b"".join(b"line %d\n" % i for i in range(3000))
    path = _write(tmp_path, raw)
    source = mb.read_lines(path, block_size=1000)
    blocks = await _blocks(source)
    all_lines = await _lines(source)
    for block in blocks[::7]:
        resumed = source.with_start(block.end)
        assert resumed.start == block.end and resumed.path == source.path
        rest = await _lines(resumed)
        assert rest == all_lines[len(all_lines) - len(rest) :]
        assert raw[block.end :].count(b"\n") == len(rest)
    assert await _lines(source.with_start(len(raw))) == []
    with pytest.raises(ValueError, match="not the beginning of a line"):
        await _lines(source.with_start(3))
    with pytest.raises(ValueError, match="past the end"):
        await _lines(source.with_start(len(raw) + 1))
    with pytest.raises(ValueError, match="start must be"):
        mb.read_lines(path, start=-1)


@pytest.mark.anyio
@pytest.mark.parametrize("block_size", [7, 64, 1 << 20])
async def test_line_too_long_names_path_and_offset_after_earlier_records(
    tmp_path: Path, block_size: int
) -> None:
    raw = b"short\n" + b"x" * 20 + b"\n" + b"y" * 21 + b"\nafter\n"
    path = _write(tmp_path, raw)
    got: list[str] = []
    with pytest.raises(mb.LineTooLong) as info:
        async for line in mb.read_lines(path, max_line_length=20, block_size=block_size):
            got.append(line)
    assert got == ["short", "x" * 20]
    assert info.value.offset == raw.index(b"y")
    assert info.value.where == str(path)
    assert str(path) in str(info.value) and "max_line_length=20" in str(info.value)


@pytest.mark.anyio
async def test_last_line_without_newline_too_long(tmp_path: Path) -> None:
    path = _write(tmp_path, b"a\n" + b"z" * 11)
    with pytest.raises(mb.LineTooLong) as info:
        await _lines(mb.read_lines(path, max_line_length=10, block_size=4))
    assert info.value.offset == 2


@pytest.mark.anyio
async def test_decode_error_names_path_and_offset_after_earlier_records(tmp_path: Path) -> None:
    raw = b"good\nalso good\nbad \xff here\nnever\n"
    path = _write(tmp_path, raw)
    got: list[str] = []
    with pytest.raises(mb.SourceDecodeError) as info:
        async for line in mb.read_lines(path):
            got.append(line)
    assert got == ["good", "also good"]
    assert info.value.offset == raw.index(b"\xff")
    assert str(path) in str(info.value) and "errors='replace'" in str(info.value)
    replaced = await _lines(mb.read_lines(path, errors="replace"))
    assert replaced[2] == "bad \ufffd here" and len(replaced) == 4
    assert (await _lines(mb.read_lines(path, encoding=None)))[2] == b"bad \xff here"


@pytest.mark.anyio
async def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        await _lines(mb.read_lines(path))
    # A followed file is waited for; past wait_for_file, the error names the path and the wait.
    with pytest.raises(FileNotFoundError, match=r"nope\.txt did not appear within wait_for_file=0\.05 s"):
        await _lines(mb.read_lines(path, follow=True, wait_for_file=0.05, poll_interval=0.01))
    with pytest.raises(ValueError, match="wait_for_file waits for a file to follow"):
        mb.read_lines(path, wait_for_file=1)
    with pytest.raises(ValueError, match="wait_for_file"):
        mb.read_lines(path, follow=True, wait_for_file=-1)


def test_invalid_arguments_name_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ASCII-compatible"):
        mb.read_lines(tmp_path / "x", encoding="utf-16")
    with pytest.raises(LookupError, match="encoding='nope'"):
        mb.read_lines(tmp_path / "x", encoding="nope")
    with pytest.raises(LookupError, match="errors='bogus'"):
        mb.read_lines(tmp_path / "x", errors="bogus")
    with pytest.raises(ValueError, match="block_size"):
        mb.read_lines(tmp_path / "x", block_size=0)
    with pytest.raises(ValueError, match="max_line_length"):
        mb.read_lines(tmp_path / "x", max_line_length=0)
    with pytest.raises(ValueError, match="poll_interval"):
        mb.read_lines(tmp_path / "x", poll_interval=float("nan"))


def _open_fds_to(path: Path) -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == str(path):
                count += 1
        except OSError:
            pass
    return count


@pytest.mark.anyio
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
async def test_closing_an_iteration_early_closes_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, b"a\n" * 10_000)
    source = mb.read_lines(path, block_size=100)
    async with aclosing(source.__aiter__()) as lines:
        assert await lines.__anext__() == "a"
        assert _open_fds_to(path) == 1
    assert _open_fds_to(path) == 0
    async with aclosing(source.chunks()) as chunks:
        await chunks.__anext__()
    async with aclosing(source.parts()) as parts:
        await parts.__anext__()
    assert _open_fds_to(path) == 0


@pytest.mark.anyio
async def test_source_is_reusable_and_typed_attributes(tmp_path: Path) -> None:
    path = _write(tmp_path, b"1\n2\n")
    source = mb.read_lines(path, encoding="latin-1", errors="replace")
    assert (source.path, source.encoding, source.errors, source.start, source.follow) == (
        str(path),
        "latin-1",
        "replace",
        0,
        False,
    )
    assert await _lines(source) == await _lines(source) == ["1", "2"]
    assert "read_lines(" in repr(source)
    with anyio.fail_after(5):
        assert await _lines(mb.read_lines(str(path))) == ["1", "2"]


@pytest.mark.anyio
async def test_protocol_describe_and_resume_at_a_byte_offset(tmp_path: Path) -> None:
    path = _write(tmp_path, b"one\ntwo\nthree\n")
    source = mb.read_lines(path)
    assert isinstance(source, LineParts)
    # The fingerprint text of checkpoints written before the protocol existed.
    assert source.describe() == f"file:{os.path.abspath(path)}"
    assert source.resume(None) is source and source.resume(0) is source
    assert await _lines(source.resume(4)) == ["two", "three"]
    with pytest.raises(TypeError, match="position"):
        source.resume("4")
