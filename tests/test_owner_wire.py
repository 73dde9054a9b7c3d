"""The bytes of a part file: every key and partial comes back, and damaged bytes are refused."""

from __future__ import annotations

from typing import Any

import pytest

from microbatch._core import ownerwire as wire
from microbatch.pipeline.owned import OWNED_SPLIT_SIZE, owned_split_sizes

PART: dict[int, dict[Any, int]] = {
    3: {"a": 1, "": 2, "\udcff-surrogate": 3, "é": -4},  # str keys: text block
    5: {"two\nlines": 1, "b": 2},  # a key with a newline: msgpack block
    7: {("t", 1): 4, 2: 5},  # other keys: msgpack block
    11: {"": 7},  # one empty key
    12: {"big": 1 << 63},  # beyond int64: msgpack block
}


def test_a_part_comes_back_whole_in_either_block_kind() -> None:
    data = wire.pack_part({shard: (items.keys(), items.values()) for shard, items in PART.items()})
    kinds = []
    got = {}
    pos = 0
    while pos < len(data):
        kind, shard, count, length = wire.BLOCK.unpack_from(data, pos)
        kinds.append((shard, kind))
        pos += wire.BLOCK.size + length + (8 * count if kind == wire.TEXT else 0)
    for shard, keys, values in wire.unpack_part(data):
        got[shard] = dict(zip(keys, values, strict=True))
    assert got == PART
    assert dict(kinds) == {3: wire.TEXT, 5: wire.MSGPACK, 7: wire.MSGPACK, 11: wire.TEXT, 12: wire.MSGPACK}


def test_a_part_cut_short_or_damaged_is_refused() -> None:
    data = wire.pack_part({shard: (items.keys(), items.values()) for shard, items in PART.items()})
    for cut in range(1, len(data)):
        try:
            list(wire.unpack_part(data[:cut]))
        except ValueError:
            continue  # msgpack's errors are ValueErrors too
    with pytest.raises(ValueError, match="cut short at byte 0"):
        list(wire.unpack_part(data[:5]))
    with pytest.raises(ValueError, match="unknown kind 9"):
        list(wire.unpack_part(bytes([9]) + data[1:]))


def test_a_run_with_owners_reads_whole_splits_unless_told_otherwise() -> None:
    # The default split size follows the keys (tests/test_split_sizer.py), each split one batch.
    assert owned_split_sizes(2 << 20, True, True)[1] == OWNED_SPLIT_SIZE
    assert owned_split_sizes(2 << 20, False, True) == (2 << 20, 2 << 20)  # split_size given
    assert owned_split_sizes(OWNED_SPLIT_SIZE, True, False)[1] is None  # max_size given
    assert owned_split_sizes(None, False, True) == (None, None)  # no splits


def test_the_final_values_read_from_part_bytes_shard_by_shard() -> None:
    from microbatch._core.ring import ring
    from microbatch.pipeline.owned import PackedValues

    place = ring(8)
    expected: dict[Any, int] = {f"k{i}": i for i in range(500)} | {("t", 1): 7, 3: 9, "a\nb": 2}
    by_shard: dict[int, dict[Any, int]] = {}
    for key, value in expected.items():
        by_shard.setdefault(place.shard_of(key), {})[key] = value
    owners = [{s: v for s, v in by_shard.items() if s % 2 == o} for o in range(2)]
    taken = [bytearray(wire.pack_part({s: (v.keys(), v.values()) for s, v in p.items()})) for p in owners]
    values = PackedValues(taken, place)
    assert len(values) == len(expected)
    assert dict(values) == expected
    assert dict(values.items()) == expected
    assert sorted(values.values()) == sorted(expected.values())
    assert values["k7"] == 7 and values[("t", 1)] == 7 and values["a\nb"] == 2
    assert values.get("missing") is None and 1.5 not in values and "k499" in values


def test_a_shard_mostly_changed_is_written_whole_untracked_until_it_quiets(tmp_path: Any) -> None:
    """An owner tracks a shard's changed keys for a delta; once most changed between two
    checkpoints it writes the shard whole, and keeps doing so without tracking keys while each
    period folds more keys into it than half it holds; a quiet period brings deltas back."""
    from microbatch.checkpoints.shards import MANIFEST_FORMAT
    from microbatch.executors.ownerproc import ShardState

    folder = str(tmp_path / "state")
    owner = ShardState()
    keys = [f"k{i}" for i in range(1_000)]
    expected: dict[str, int] = {}

    def fold(some: list[str]) -> None:
        owner.fold_part(wire.pack_part({0: (some, [1] * len(some))}))
        for key in some:
            expected[key] = expected.get(key, 0) + 1

    kinds = []
    for seq, some in enumerate([keys, keys[:900], keys[:900], keys[:10], keys[:10]], 1):
        fold(some)
        if seq == 3:
            assert owner.changed == {} and 0 in owner.hot  # hot: no set of its keys
        entry = owner.write_barrier(seq, folder, [0], 1)[0]
        kinds.append("delta" if entry["deltas"] else "base")
    # 1: the first checkpoint; 2: 900 of 1,000 keys changed (tracked); 3: hot, 900 folded;
    # 4: hot and folded into, 10 keys (then no longer hot); 5: tracked again, a delta.
    assert kinds == ["base", "base", "base", "base", "delta"]
    manifest = {"format": MANIFEST_FORMAT, "seq": 5, "shards": 1, "entries": [entry]}
    loaded = ShardState()
    assert loaded.load_shards(folder, manifest, [0], 1) == 1_000
    assert loaded.shards[0] == expected
