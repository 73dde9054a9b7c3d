"""Split planning and the line-ownership rule: every line read by exactly one split, in order."""

from __future__ import annotations

import itertools
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microbatch._core import splittask
from microbatch._core.lines import decode_lines
from microbatch._core.splits import FileSplit, owned_range, plan_splits
from microbatch._core.splittask import SplitTask, read_split, split_blocks
from microbatch._core.task import BatchTask
from microbatch._exceptions import LineTooLong

BIG = 1 << 20

line = st.one_of(
    st.binary(max_size=3).map(lambda b: b.replace(b"\n", b"x").replace(b"\r", b"y")),
    st.text(alphabet="ab\r", max_size=40).map(str.encode),
    st.integers(min_value=50, max_value=400).map(lambda n: b"L" * n),
)
terminator = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def files(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(line, terminator), max_size=30))
    data = b"".join(body + end for body, end in lines)
    if draw(st.booleans()):
        data += draw(line)  # a last line without a newline (possibly empty: no line)
    return data


def records_of_splits(path: Path, data: bytes, start: int, split_size: int) -> list[bytes]:
    records: list[bytes] = []
    with path.open("rb") as f:
        for lo, hi in plan_splits(start, len(data), split_size):
            owned, first = read_split(f, FileSplit(str(path), lo, hi, 7, BIG), str(path))
            assert data[first : first + len(owned)] == owned
            records += decode_lines(owned, encoding=None, errors="strict", where="x", start=first)
    return records


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=files(), split_size=st.integers(min_value=1, max_value=120))
def test_splits_read_every_line_once_in_order(tmp_path: Path, data: bytes, split_size: int) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    expected = decode_lines(data, encoding=None, errors="strict", where="x", start=0)
    assert records_of_splits(path, data, 0, split_size) == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=files(), split_size=st.integers(min_value=1, max_value=120), pick=st.integers(min_value=0))
def test_resuming_at_a_line_start_reads_the_rest_with_the_same_later_splits(
    tmp_path: Path, data: bytes, split_size: int, pick: int
) -> None:
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == 10]
    resume = starts[pick % len(starts)]
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    rest = decode_lines(data[resume:], encoding=None, errors="strict", where="x", start=resume)
    assert records_of_splits(path, data, resume, split_size) == rest
    whole = list(plan_splits(0, len(data), split_size))
    after = list(plan_splits(resume, len(data), split_size))
    # The same grid after the first (partial) split of the resumed run.
    assert after[1:] == [s for s in whole if s[0] >= (after[0][1] if after else len(data))]


@settings(max_examples=300, deadline=None)
@given(data=files(), split_size=st.integers(min_value=1, max_value=120))
def test_the_pure_rule_agrees_with_the_file_reader(data: bytes, split_size: int) -> None:
    pieces = []
    for lo, hi in plan_splits(0, len(data), split_size):
        offset = max(lo - 1, 0)
        got = owned_range(data[offset:], offset, lo, hi, at_eof=True)
        assert got is not None
        pieces.append(data[offset + got[0] : offset + got[1]])
    assert b"".join(pieces) == data


def test_owned_range_asks_for_more_bytes_when_a_line_is_not_finished() -> None:
    assert owned_range(b"abc\ndef", 0, 2, 6, at_eof=False) is None
    assert owned_range(b"abc\ndef", 0, 2, 6, at_eof=True) == (4, 7)
    assert owned_range(b"abcdef", 0, 2, 4, at_eof=False) is None
    assert owned_range(b"abcdef", 0, 2, 4, at_eof=True) == (6, 6)


def test_plan_splits_is_a_grid_and_checks_its_parameters() -> None:
    assert list(plan_splits(0, 10, 4)) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    assert list(plan_splits(5, 10, 4)) == [(5, 8), (8, 10)]
    assert list(plan_splits(10, 10, 4)) == []
    # The first split_size bytes in smaller splits (1/8, 1/8, 1/4, 1/2), so results come sooner.
    assert list(plan_splits(0, 100, 32)) == [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 96), (96, 100)]
    assert list(plan_splits(0, 9, 3)) == [(0, 1), (1, 3), (3, 6), (6, 9)]
    with pytest.raises(ValueError, match="split_size"):
        list(plan_splits(0, 10, 0))
    with pytest.raises(ValueError, match="FileSplit of f"):
        FileSplit("f", 5, 4, 1, 1)


def test_a_long_line_is_refused_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    data = b"ok\n" + b"x" * 50 + b"\nok\n"
    path.write_bytes(data)
    with path.open("rb") as f:
        with pytest.raises(LineTooLong) as info:
            read_split(f, FileSplit(str(path), 0, 5, 10, 20), str(path))
        assert info.value.offset == 3 and str(path) in str(info.value)
        # A split inside the long line owns nothing and does not read it whole.
        assert read_split(f, FileSplit(str(path), 10, 20, 10, 20), str(path)) == (b"", 54)
        assert read_split(f, FileSplit(str(path), 20, 60, 10, 20), str(path)) == (b"ok\n", 54)


@settings(max_examples=300, deadline=None)
@given(data=files(), max_size=st.integers(min_value=1, max_value=12))
def test_batch_bounds_cut_every_max_size_lines(data: bytes, max_size: int) -> None:
    records = decode_lines(data, encoding=None, errors="strict", where="x", start=0)
    blocks = split_blocks(data, 5, max_size)
    assert b"".join(b.data for b in blocks) == data
    sizes = [min(max_size, len(records) - i) for i in range(0, len(records), max_size)]
    assert [b.count for b in blocks] == sizes
    cut = [decode_lines(b.data, encoding=None, errors="strict", where="x", start=b.start) for b in blocks]
    assert [r for rs in cut for r in rs] == records
    assert all(len(rs) == b.count for rs, b in zip(cut, blocks, strict=True))
    assert all(b.start == 5 + sum(len(c.data) for c in blocks[:i]) for i, b in enumerate(blocks))


def test_split_blocks_cut_batches_of_max_size_lines_with_their_offsets() -> None:
    blocks = split_blocks(b"a\nb\nc\nd\ne", 10, 2)
    assert [(b.count, b.start, b.end) for b in blocks] == [(2, 10, 14), (2, 14, 18), (1, 18, 19)]
    assert split_blocks(b"", 3, 2) == []


def _sum(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def test_split_task_runs_fn_per_batch_and_survives_pickling(tmp_path: Path) -> None:
    path = tmp_path / "n.txt"
    path.write_text("".join(f"{i}\n" for i in range(100)))
    task = pickle.loads(pickle.dumps(SplitTask(BatchTask(_sum, encoding="utf-8", where=str(path)))))
    size = path.stat().st_size
    outcomes = [o for lo, hi in plan_splits(0, size, 64) for o in task(FileSplit(str(path), lo, hi, 7, BIG))]
    assert sum(o[0] for o in outcomes) == 100
    assert sum(o[3] for o in outcomes) == sum(range(100))
    assert all(o[0] <= 7 for o in outcomes)
    ends = [(o[1], o[2]) for o in outcomes]
    assert ends[0][0] == 0 and ends[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))


def _records(lines: list[bytes]) -> list[bytes]:
    return lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=files(),
    split_size=st.integers(min_value=1, max_value=120),
    max_size=st.integers(min_value=1, max_value=5),
    scan=st.sampled_from([1, 7, 1 << 16]),
)
def test_the_worker_side_task_sees_every_line_once_in_batches(
    tmp_path: Path, data: bytes, split_size: int, max_size: int, scan: int
) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    task = SplitTask(BatchTask(_records, encoding=None, where=str(path)))
    saved = splittask._SCAN_BLOCK
    splittask._SCAN_BLOCK = scan  # how far past a split one read goes: also the rare paths
    try:
        outcomes = [
            o
            for lo, hi in plan_splits(0, len(data), split_size)
            for o in task(FileSplit(str(path), lo, hi, max_size, BIG))
        ]
    finally:
        splittask._SCAN_BLOCK = saved
    assert [r for o in outcomes for r in o[3]] == decode_lines(
        data, encoding=None, errors="strict", where="x", start=0
    )
    assert all(o[0] == len(o[3]) and 0 < o[0] <= max_size for o in outcomes)
    if outcomes:  # the batches cover the file from its first line to its end, without gaps
        assert outcomes[0][1] == 0 and outcomes[-1][2] == len(data)
    assert all(a[2] == b[1] for a, b in itertools.pairwise(outcomes))


def test_the_worker_side_of_splits_imports_neither_anyio_nor_the_pipeline() -> None:
    code = (
        "import sys, microbatch._core.splittask;"
        "print(sorted(m for m in ('anyio', 'microbatch.pipeline', 'dataclasses') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
