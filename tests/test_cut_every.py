"""cut_every: the pipeline's way of cutting read blocks into batches of exactly max_size lines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from microbatch._lines import LineBlock, cut_every, cut_lines


@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=300),
    last_newline=st.booleans(),
    n=st.integers(1, 50),
    start=st.integers(0, 10_000),
)
def test_cut_every_matches_repeated_cut_lines(
    lines: list[bytes], last_newline: bool, n: int, start: int
) -> None:
    if lines and not lines[-1]:
        last_newline = True  # an empty piece after the last newline is not a line
    data = b"\n".join(lines) + (b"\n" if last_newline and lines else b"")
    block = LineBlock(data, len(lines), start, start + len(data))
    times = len(lines) // n
    parts, rest = cut_every(block, n, times)
    expected = []
    remainder = block
    for _ in range(times):
        head, remainder = cut_lines(remainder, n)
        expected.append(head)
    assert parts == expected
    assert rest == remainder
    assert b"".join(p.data for p in parts) + rest.data == data


def test_cut_every_refuses_more_lines_than_the_block_holds() -> None:
    block = LineBlock(b"a\nb\n", 2, 0, 4)
    try:
        cut_every(block, 2, 2)
    except ValueError as exc:
        assert "2 x 2" in str(exc)
    else:
        raise AssertionError("cut_every accepted 4 lines from a block of 2")
