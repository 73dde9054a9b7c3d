"""The fingerprint of a file's prefix: the same kept incrementally as computed at once, and a
change anywhere before the offset found in the range that holds it (sampled: where it samples)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microbatch.checkpoints import prefix
from microbatch.checkpoints.prefix import PrefixHasher, first_difference, prefix_ranges


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small pieces and samples so that a test file of a few KiB has many of them.
    monkeypatch.setattr(prefix, "PIECE", 64)
    monkeypatch.setattr(prefix, "SAMPLE", 16)


DATA = bytes(range(256)) * 40  # 10,240 bytes


@settings(max_examples=60, deadline=None)
@given(
    offsets=st.lists(st.integers(0, len(DATA)), min_size=1, max_size=8),
    mode=st.sampled_from(["full", "sampled"]),
)
def test_kept_between_checkpoints_equals_computed_at_once(tmp_path_factory: pytest.TempPathFactory,
                                                          offsets: list[int], mode: str) -> None:
    path = tmp_path_factory.mktemp("prefix") / "data"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = PrefixHasher()
        for offset in sorted(offsets):  # checkpoints come in order; an earlier one starts over
            kept = hasher.ranges(fd, offset, mode)  # type: ignore[arg-type]
            assert kept == prefix_ranges(fd, offset, mode)  # type: ignore[arg-type]
            assert first_difference(fd, kept) is None
            if mode == "full":
                covered = [b for s, e, _ in kept for b in range(s, e)]
                assert covered == list(range(offset)) and len(kept) <= prefix.MAX_RANGES
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(at=st.integers(0, len(DATA) - 1))
def test_a_changed_byte_is_found_in_its_range(tmp_path_factory: pytest.TempPathFactory, at: int) -> None:
    path = tmp_path_factory.mktemp("prefix") / "data"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        full = prefix_ranges(fd, len(DATA), "full")
        sampled = prefix_ranges(fd, len(DATA), "sampled")
    finally:
        os.close(fd)
    changed = bytearray(DATA)
    changed[at] ^= 0xFF
    path.write_bytes(bytes(changed))
    fd = os.open(path, os.O_RDONLY)
    try:
        start, end = first_difference(fd, full) or (-1, -1)
        assert start <= at < end
        found = first_difference(fd, sampled)
        in_sample = any(s <= at < e for s, e, _ in sampled)
        assert (found is not None) == in_sample  # sampled: blind outside its blocks
    finally:
        os.close(fd)


def test_a_shorter_file_differs_in_the_range_it_no_longer_holds(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        full = prefix_ranges(fd, len(DATA), "full")
    finally:
        os.close(fd)
    path.write_bytes(DATA[:1000])
    fd = os.open(path, os.O_RDONLY)
    try:
        start, end = first_difference(fd, full) or (-1, -1)
    finally:
        os.close(fd)
    assert start <= 1000 < end
