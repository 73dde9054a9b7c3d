"""The consistent-hash ring and the key encoding: stable across processes, few keys moved per new shard."""

from __future__ import annotations

import bisect
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microbatch._core.keys import bad_key, is_key, key_bytes, key_from_json, key_hash, key_to_json
from microbatch._core.ring import Ring, ring

ROOT = Path(__file__).resolve().parent.parent

keys = st.recursive(
    st.one_of(st.text(max_size=8), st.integers(min_value=-(2**80), max_value=2**80)),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=6,
)

SAMPLE = ["", "a", "alice", "ünïcödé", "\udcff", 0, 1, -1, 255, 256, -129, 2**70,
          ("a", 1), ("a", ("b", 2)), ()]

_PRINT_SHARDS = """
import json, sys
from microbatch._core.keys import key_from_json, key_hash
from microbatch._core.ring import Ring
sample = [key_from_json(k) for k in json.loads(sys.argv[1])]
r = Ring(7)
print(json.dumps([[key_hash(k), r.shard_of(k)] for k in sample]))
"""


def test_hash_and_shard_are_the_same_in_another_process_with_another_hash_seed() -> None:
    here = Ring(7)
    expected = [[key_hash(k), here.shard_of(k)] for k in SAMPLE]
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", _PRINT_SHARDS, json.dumps([key_to_json(k) for k in SAMPLE])],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
        assert json.loads(out) == expected
    # pinned bytes: a change of encoding would silently move every key of old checkpoints
    assert key_bytes("ab") == b"s\x02ab"
    assert key_bytes(-1) == b"i\x01\xff"
    assert key_bytes(255) == b"i\x02\x00\xff"
    assert key_bytes(("a", 1)) == b"t\x02s\x01ai\x01\x01"


def test_pinned_hashes_of_the_documented_encoding() -> None:
    import xxhash

    assert key_hash("alice") == xxhash.xxh3_64_intdigest(b"alice", 0x73)
    assert key_hash(256) == xxhash.xxh3_64_intdigest(b"\x01\x00", 0x69)
    assert key_hash(("a", 1)) == xxhash.xxh3_64_intdigest(b"t\x02s\x01ai\x01\x01", 0x74)
    assert key_hash("\udcff") == xxhash.xxh3_64_intdigest(b"\xed\xb3\xbf", 0x73)


@given(keys, keys)
def test_encoding_is_injective_and_json_form_round_trips(a: object, b: object) -> None:
    assert (key_bytes(a) == key_bytes(b)) == (a == b)
    assert key_from_json(json.loads(json.dumps(key_to_json(a)))) == a
    assert is_key(a)


def test_shard_of_matches_a_plain_search_of_the_ring() -> None:
    """The lookup table agrees with a binary search of the points, at and around every point."""
    r = Ring(5, vnodes=64)
    placed = sorted(zip(r._points, r._owners, strict=True))
    pts = [p for p, _ in placed]

    def slow(h: int) -> int:
        return placed[bisect.bisect_left(pts, h) % len(pts)][1]

    rng = random.Random(3)
    probes = [rng.getrandbits(64) for _ in range(20_000)]
    probes += [(p + d) % 2**64 for p in pts for d in (-1, 0, 1)] + [0, 2**64 - 1]
    assert [r.shard_of_hash(h) for h in probes] == [slow(h) for h in probes]
    assert set(r.shard_of_hash(h) for h in probes) == set(range(5))


def test_split_places_each_item_in_its_shard() -> None:
    r = ring(4)
    result: dict[object, int] = {f"k{i}": i for i in range(1000)}
    result |= {i: i for i in range(1000)} | {("t", i): i for i in range(50)}
    parts = r.split(result)
    assert len(parts) == 4
    assert sum(map(len, parts)) == len(result)
    for shard, part in enumerate(parts):
        assert part and all(r.shard_of(k) == shard and result[k] == v for k, v in part.items())


@pytest.mark.parametrize("key, words", [
    (1.5, ["1.5", "float"]), (None, ["None", "NoneType"]), (["a"], ["['a']", "list"]),
    (True, ["True", "bool"]), (("a", 2.0), ["('a', 2.0)", "2.0", "float"]), (b"x", ["bytes"]),
])
def test_bad_keys_are_refused_naming_the_key(key: object, words: list[str]) -> None:
    calls = [key_hash, key_bytes, ring(3).shard_of]
    if not isinstance(key, list):
        calls.append(lambda k: ring(3).split({"ok": 1, k: 2}))
    for call in calls:
        with pytest.raises(TypeError) as info:
            call(key)
        for word in words:
            assert word in str(info.value)
    assert not is_key(key)
    assert "str, int (not bool) or tuples" in bad_key(key)


def test_json_form_refuses_what_no_key_becomes() -> None:
    for data in (1.5, None, {"a": 1}, True, [1, None]):
        with pytest.raises(ValueError, match="not the JSON form of a key"):
            key_from_json(data)


def test_ring_pickles_as_its_settings_and_checks_them() -> None:
    r = Ring(6, vnodes=32)
    copy = pickle.loads(pickle.dumps(r))
    assert copy == r and copy.shard_of("x") == r.shard_of("x")
    assert len(pickle.dumps(r)) < 200
    with pytest.raises(ValueError, match="shards"):
        Ring(0)
    with pytest.raises(TypeError, match="shards"):
        Ring(2.0)  # type: ignore[arg-type]


def test_one_more_shard_moves_only_the_keys_it_takes_and_at_most_1_5_over_n_plus_1() -> None:
    """Measured on 100k keys of each kind: N -> N+1 moves keys only to the new shard, few of them."""
    sample: list[object] = [f"user-{i}" for i in range(40_000)]
    sample += list(range(-10_000, 30_000))
    sample += [("host", i % 97, str(i)) for i in range(20_000)]
    hashes = [key_hash(k) for k in sample]
    one = Ring(1)
    before = [one.shard_of_hash(h) for h in hashes]
    for n in range(1, 9):
        after_ring = Ring(n + 1)
        after = [after_ring.shard_of_hash(h) for h in hashes]
        moved = [b for a, b in zip(before, after, strict=True) if a != b]
        assert set(moved) <= {n}, f"{n} -> {n + 1}: keys moved between old shards"
        fraction = len(moved) / len(sample)
        assert 0.5 / (n + 1) <= fraction <= 1.5 / (n + 1), (n, fraction)
        before = after


def test_keyed_state_imports_neither_anyio_nor_the_pipeline() -> None:
    """Workers and shard owners split and fold keyed state without loading the async shell."""
    code = (
        "import sys, microbatch._core.ring, microbatch.aggregate, microbatch.checkpoints.shards;"
        "print(sorted(m for m in ('anyio', 'aiofiles', 'microbatch.pipeline') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
