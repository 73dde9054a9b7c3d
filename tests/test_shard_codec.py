"""The binary shard file (msgpack with a checksum) and ShardFiles writing it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from microbatch import ByKey, Count, Mean
from microbatch._exceptions import CheckpointCorrupt
from microbatch.checkpoints.shardcodec import decode_document, encode_document
from microbatch.checkpoints.shards import ShardFiles


def _doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": "microbatch.keyed/1", "shard": 3, "shards": 16, "kind": "delta", "count": 10,
        "keys": ["a", 7, ["t", 1], "lone \udcff", 2**80, -(2**70)],
        "states": [1, 2, 3, 4, 5, {"n": 1, "sum": [1, 2]}],
    }
    doc.update(over)
    return doc


def test_round_trip() -> None:
    doc = _doc()
    assert decode_document(encode_document(doc), "x") == doc
    base = _doc(kind="base", keys=[], states=[], count=0)
    assert decode_document(encode_document(base), "x") == base


def test_smaller_than_json(tmp_path: Path) -> None:
    import json

    doc = _doc(keys=[f"user-{i:07d}" for i in range(10_000)], states=list(range(10_000)), count=10_000)
    assert len(encode_document(doc)) < 0.8 * len(json.dumps(doc))


@pytest.mark.parametrize("offset", [0, 4, 30, 40, -1])
def test_a_changed_byte_is_refused_naming_the_file(offset: int) -> None:
    data = bytearray(encode_document(_doc()))
    data[offset] ^= 0x40
    with pytest.raises(CheckpointCorrupt, match="shard-0003"):
        decode_document(bytes(data), "shard-0003")


def test_cut_short_and_empty_are_refused() -> None:
    data = encode_document(_doc())
    for cut in (0, 10, len(data) - 1):
        with pytest.raises(CheckpointCorrupt, match=r"f\.mbk"):
            decode_document(data[:cut], "f.mbk")


def test_a_value_msgpack_cannot_hold_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="set"):
        encode_document(_doc(states=[{1}] * 6))


@pytest.mark.parametrize("inner", [Count(), Mean()])
def test_shard_files_binary_round_trip(tmp_path: Path, inner: object) -> None:
    agg = ByKey(inner, shards=4)  # type: ignore[arg-type]
    state = agg.initial()
    agg.mark_all_changed(state)
    files = ShardFiles(tmp_path, fsync=False, binary=True)
    batches = [Counter(f"k{i % 97}" for i in range(j, j + 300)) for j in range(0, 3000, 300)]
    batches.append(Counter({("t", 1): 2, 2**70: 1}))
    manifest = None
    for seq, batch in enumerate(batches):
        state = agg.fold(state, batch)
        manifest = files.write(seq, agg.dump_changes(state), shards=4)
    assert manifest is not None
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(name.endswith(".mbk") for name in names)
    loaded = agg.load_documents(files.read(manifest))
    assert dict(agg.value(loaded)) == dict(agg.value(state))
    # read back by a reader that writes JSON itself: the suffix decides
    assert dict(agg.value(agg.load_documents(ShardFiles(tmp_path).read(manifest)))) == dict(agg.value(state))


def test_damaged_binary_file_is_refused_by_name(tmp_path: Path) -> None:
    agg = ByKey(Count(), shards=2)
    state = agg.fold(agg.initial(), {"a": 1, "b": 2, "c": 3})
    agg.mark_all_changed(state)
    files = ShardFiles(tmp_path, fsync=False, binary=True)
    manifest = files.write(0, agg.dump_changes(state), shards=2)
    victim = next(tmp_path.iterdir())
    data = bytearray(victim.read_bytes())
    data[-3] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=victim.name):
        list(files.read(manifest))
