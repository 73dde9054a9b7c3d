"""cut_parts and cut_lines: how the pipeline cuts what it reads into batches of exactly max_size lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microbatch._core.lines import LineBlock, LineSplitter, cut_lines, cut_parts


def cut_by_lines(block: LineBlock, n: int) -> tuple[list[LineBlock], LineBlock]:
    """The reference: blocks of ``n`` lines cut one at a time with ``cut_lines``, and the rest."""
    blocks = []
    while block.count >= n:
        head, block = cut_lines(block, n)
        blocks.append(head)
    return blocks, block


@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=300),
    last_newline=st.booleans(),
    n=st.integers(1, 50),
    start=st.integers(0, 10_000),
)
def test_cut_parts_of_one_block_matches_repeated_cut_lines(
    lines: list[bytes], last_newline: bool, n: int, start: int
) -> None:
    if not lines[-1]:
        last_newline = True  # an empty piece after the last newline is not a line
    data = b"\n".join(lines) + (b"\n" if last_newline else b"")
    block = LineBlock(data, len(lines), start, start + len(data))
    parts, rest = cut_parts(None, b"", data, len(data), start, n, len(lines))
    expected, remainder = cut_by_lines(block, n)
    assert parts == expected
    assert (rest or LineBlock(b"", 0, block.end, block.end)) == remainder
    assert b"".join(p.data for p in parts) + (rest.data if rest else b"") == data


def test_cut_parts_refuses_a_part_without_lines() -> None:
    try:
        cut_parts(None, b"", b"a\n", 2, 0, 2, 0)
    except ValueError as exc:
        assert "count must be >= 1" in str(exc)
    else:
        raise AssertionError("cut_parts accepted a part of 0 lines")


@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=200),
    last_newline=st.booleans(),
    n=st.integers(1, 40),
    reads=st.lists(st.integers(1, 200), min_size=1, max_size=30),
    start=st.integers(0, 1_000),
)
def test_cut_parts_of_split_reads_equal_the_blocks_of_the_whole(
    lines: list[bytes], last_newline: bool, n: int, reads: list[int], start: int
) -> None:
    """The pipeline's reader: parts of reads, cut where they lie, give the blocks of the whole."""
    if not lines[-1]:
        last_newline = True  # an empty piece after the last newline is not a line
    data = b"\n".join(lines) + (b"\n" if last_newline else b"")
    splitter = LineSplitter("<test>", start, max_line_length=1 << 20)
    parts = []
    offset, k = 0, 0
    while offset < len(data):
        size = reads[k % len(reads)]
        k += 1
        chunk = data[offset : offset + size]
        offset += len(chunk)
        got = splitter.feed_parts(chunk)
        if got is not None:
            head, end = got
            parts.append((head, chunk, end, splitter.position - len(head) - end))
    last = splitter.finish()
    if last is not None:
        parts.append((b"", last, len(last), splitter.position - len(last)))

    blocks: list[LineBlock] = []
    pending: LineBlock | None = None
    for head, chunk, end, at in parts:
        assert pending is None or pending.end == at
        count = chunk.count(b"\n", 0, end) + (chunk[end - 1] != 10)
        full, pending = cut_parts(pending, head, chunk, end, at, n, count)
        assert all(block.count == n for block in full)
        blocks.extend(full)

    whole = LineBlock(data, len(lines), start, start + len(data))
    expected, rest = cut_by_lines(whole, n)
    assert blocks == expected
    if pending is None:
        assert rest.count == 0 and rest.end == start + len(data)
    else:
        assert pending == rest


def test_cut_parts_refuses_a_full_pending_block() -> None:
    with pytest.raises(ValueError, match="fewer than n"):
        cut_parts(LineBlock(b"a\nb\n", 2, 0, 4), b"", b"c\n", 2, 4, 2, 1)


def test_line_blocks_are_immutable_values_that_survive_pickle() -> None:
    import pickle

    block = LineBlock(b"a\nb\n", 2, 10, 14)
    assert block == LineBlock(b"a\nb\n", 2, 10, 14) and hash(block) == hash(LineBlock(b"a\nb\n", 2, 10, 14))
    assert block != LineBlock(b"a\nb\n", 2, 11, 15)
    assert pickle.loads(pickle.dumps(block, protocol=5)) == block
    with pytest.raises(AttributeError, match="immutable"):
        block.count = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="end=15 must equal"):
        LineBlock(b"a\n", 1, 10, 15)
    with pytest.raises(ValueError, match="count must be >= 0"):
        LineBlock(b"", -1, 0, 0)
