"""The assignment of ring shards to shard owners, and a batch result cut by owner (pure, no I/O)."""

from __future__ import annotations

import pytest

from microbatch._core.owners import cut, owner_of_shards
from microbatch._core.ring import ring


@pytest.mark.parametrize("shards", [1, 2, 16, 64, 256])
def test_balanced(shards: int) -> None:
    for owners in range(1, min(shards, 9) + 1):
        owner = owner_of_shards(shards, owners)
        held = [owner.count(o) for o in range(owners)]
        assert max(held) - min(held) <= 1, (shards, owners, held)
        assert sorted(set(owner)) == list(range(owners))


@pytest.mark.parametrize("shards", [16, 64, 256])
def test_one_more_owner_moves_only_its_share(shards: int) -> None:
    for owners in range(1, 8):
        before, after = owner_of_shards(shards, owners), owner_of_shards(shards, owners + 1)
        moved = [s for s in range(shards) if before[s] != after[s]]
        assert all(after[s] == owners for s in moved)  # only to the new owner
        assert len(moved) <= shards / (owners + 1)


def test_four_to_five_owners_moves_about_a_fifth_of_the_keys() -> None:
    r = ring(16)
    keys = [f"user-{i}" for i in range(50_000)]
    before, after = owner_of_shards(16, 4), owner_of_shards(16, 5)
    moved = sum(before[r.shard_of(k)] != after[r.shard_of(k)] for k in keys)
    assert moved <= len(keys) / 5 * 1.25


def test_bad_counts_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="owners"):
        owner_of_shards(16, 17)
    with pytest.raises(ValueError, match="owners"):
        owner_of_shards(16, 0)


def test_cut_files_each_key_under_its_owner_and_shard() -> None:
    r = ring(16)
    owner = owner_of_shards(16, 3)
    result = {f"k{i}": i for i in range(1000)} | {7: 1, ("a", 2): 3}
    parts = cut(result, r, owner, 3)
    seen = {}
    for o, part in enumerate(parts):
        for shard, (keys, values) in part.items():
            assert keys and len(keys) == len(values) and owner[shard] == o
            for key, value in zip(keys, values, strict=True):
                assert r.shard_of(key) == shard
                seen[key] = value
    assert seen == result
    only_str = {f"k{i}": i for i in range(1000)}  # the C-level path: every key a str
    assert [r.split(only_str)[s] for s in range(16)] == [
        dict(zip(*pair, strict=True)) for pair in zip(*r.split_lists(only_str), strict=True)
    ]


def test_cut_refuses_a_bad_key() -> None:
    with pytest.raises(TypeError):
        cut({1.5: 1}, ring(4), owner_of_shards(4, 2), 2)
