"""Shard files: checkpoints of keyed state that cost what changed, read back exactly, and cleaned up."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from microbatch import CheckpointCorrupt, CheckpointWriteError
from microbatch.aggregate import ByKey, Count, Mean, Sum, TopK
from microbatch.checkpoints.shards import ShardFiles


def written(path: Path, manifest: Any, before: Any = None) -> int:
    """Bytes of the files ``manifest`` names that ``before`` did not."""
    def names(m: Any) -> dict[str, int]:
        out = {}
        for entry in (m or {}).get("entries", []):
            for meta in ([entry["base"]] if entry["base"] else []) + entry["deltas"]:
                out[meta["name"]] = meta["bytes"]
        return out
    new, old = names(manifest), names(before)
    assert all((path / name).stat().st_size == size for name, size in new.items())
    return sum(size for name, size in new.items() if name not in old)


def test_a_checkpoint_after_changing_1_percent_of_keys_writes_under_5_percent(tmp_path: Path) -> None:
    agg = ByKey(Count(), shards=16)
    files = ShardFiles(tmp_path, fsync=False)
    keys = [f"user-{i}" for i in range(100_000)]
    state = agg.fold(agg.initial(), {key: 3 for key in keys})
    full = files.write(1, agg.dump_changes(state), shards=16)
    full_bytes = written(tmp_path, full)
    changed = random.Random(5).sample(keys, 1_000)
    state = agg.fold(state, {key: 1 for key in changed})
    delta = files.write(2, agg.dump_changes(state), shards=16)
    delta_bytes = written(tmp_path, delta, full)
    assert 0 < delta_bytes <= 0.05 * full_bytes, (delta_bytes, full_bytes)
    print(f"full state {full_bytes} bytes, 1 % changed {delta_bytes} bytes")
    assert all(len(entry["deltas"]) == 1 for entry in delta["entries"])
    assert dict(agg.value(agg.load_documents(files.read(delta)))) == dict(agg.value(state))


def test_deltas_compact_into_a_new_base_and_every_manifest_reads_back_exactly(tmp_path: Path) -> None:
    agg = ByKey(Mean(), shards=3)
    files = ShardFiles(tmp_path, compact_ratio=0.5, fsync=False)
    rng = random.Random(1)
    state = agg.initial()
    manifests = []
    for seq in range(1, 30):
        picks = [rng.randrange(3000) for _ in range(150)]
        state = agg.fold(state, {(k % 7, str(k)) if k % 2 else k: (rng.random(), 1) for k in picks})
        manifests.append((files.write(seq, agg.dump_changes(state), shards=3), dict(agg.value(state))))
    bases = {e["base"]["name"] for m, _ in manifests for e in m["entries"]}
    assert len(bases) > 3  # compactions happened
    for manifest, value in manifests[-8:]:
        for entry in manifest["entries"]:
            assert sum(d["bytes"] for d in entry["deltas"]) <= 0.5 * entry["base"]["bytes"]
        assert dict(agg.value(agg.load_documents(files.read(manifest)))) == value
        assert sum(files.counts(manifest)) == len(value)


def test_collect_keeps_the_files_of_kept_manifests_only(tmp_path: Path) -> None:
    agg = ByKey(Sum(), shards=2)
    files = ShardFiles(tmp_path, compact_ratio=0.3, fsync=False)
    state = agg.initial()
    manifests = []
    for seq in range(1, 12):
        state = agg.fold(state, {f"k{seq * 7 + i}": i for i in range(40)})
        manifests.append(files.write(seq, agg.dump_changes(state), shards=2))
    (tmp_path / ".shard-leftover.tmp").write_text("x")
    (tmp_path / "checkpoint-000000000001.json").write_text("{}")  # not ours: stays
    previous, newest = manifests[-2], manifests[-1]
    removed = files.collect([previous, newest])
    assert removed and ".shard-leftover.tmp" in removed
    assert (tmp_path / "checkpoint-000000000001.json").exists()
    for manifest in (previous, newest):
        assert list(files.read(manifest))  # every file still there and intact
    with pytest.raises(CheckpointCorrupt):
        list(files.read(manifests[0]))


def test_a_damaged_or_missing_file_is_reported_by_name(tmp_path: Path) -> None:
    agg = ByKey(Sum(), shards=2)
    files = ShardFiles(tmp_path, fsync=False)
    manifest = files.write(4, agg.dump_changes(agg.fold(agg.initial(), {"a": 1, "b": 2, "c": 3})), shards=2)
    name = manifest["entries"][0]["base"]["name"]
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data.replace(b"1", b"7"))
    with pytest.raises(CheckpointCorrupt, match=name):
        list(files.read(manifest))
    (tmp_path / name).unlink()
    with pytest.raises(CheckpointCorrupt, match=name):
        list(files.read(manifest))
    with pytest.raises(CheckpointCorrupt, match="not a manifest"):
        files.counts({"format": "nope"})


def test_a_failed_write_keeps_the_changes_for_the_next_one(tmp_path: Path) -> None:
    agg = ByKey(Count(), shards=4)
    where = tmp_path / "state"
    files = ShardFiles(where, fsync=False)
    state = agg.fold(agg.initial(), {f"k{i}": 1 for i in range(1000)})
    first = files.write(1, agg.dump_changes(state), shards=4)
    state = agg.fold(state, {"k1": 1, "new": 1})
    blocked = where.rename(tmp_path / "aside")  # the folder is gone and a file stands in its way
    where.write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match="batch 2"):
        files.write(2, agg.dump_changes(state), shards=4)
    where.unlink()
    blocked.rename(where)
    state = agg.fold(state, {"k2": 1})
    third = files.write(3, agg.dump_changes(state), shards=4)
    assert third["seq"] == 3 and first["seq"] == 1
    assert dict(agg.value(agg.load_documents(files.read(third)))) == dict(agg.value(state))


@pytest.mark.parametrize("before, after", [(4, 5), (5, 3)])
def test_resume_from_files_with_another_shard_count_ends_exact(
    tmp_path: Path, before: int, after: int
) -> None:
    rng = random.Random(before)
    results = [{(rng.choice("xyz"), rng.randrange(2000)): 1 for _ in range(500)} for _ in range(8)]
    old = TopK(5, shards=before) if before == 4 else ByKey(Count(), shards=before)
    first = ShardFiles(tmp_path, fsync=False)
    results_for = results if isinstance(old, ByKey) else [{str(k): n for k, n in r.items()} for r in results]
    state = old.initial()
    for seq, result in enumerate(results_for[:5], 1):
        state = old.fold(state, result)
        manifest = first.write(seq, old.dump_changes(state), shards=before)
    # a resumed run: a new writer adopts the manifest, the state is loaded from its files
    new = TopK(5, shards=after) if before == 4 else ByKey(Count(), shards=after)
    files = ShardFiles(tmp_path, fsync=False)
    files.adopt(json.loads(json.dumps(manifest)))
    state = new.load_documents(files.read(manifest))
    for seq, result in enumerate(results_for[5:], 6):
        state = new.fold(state, result)
        manifest = files.write(seq, new.dump_changes(state), shards=after)
    assert manifest["shards"] == after and len(manifest["entries"]) == after
    reread = new.load_documents(files.read(manifest))
    full = old.initial()
    for result in results_for:
        full = old.fold(full, result)
    assert new.value(reread) == new.value(state)
    if isinstance(new, ByKey):
        assert dict(new.value(reread)) == dict(old.value(full))
        some = next(iter(results_for[0]))
        assert files.lookup(manifest, some) == (True, old.value(full)[some])
        assert files.lookup(manifest, ("nope", 1)) == (False, None)
    else:
        assert new.value(reread) == old.value(full)


def test_a_fresh_writer_refuses_deltas_it_has_no_base_for(tmp_path: Path) -> None:
    agg = ByKey(Sum(), shards=2)
    state = agg.load(agg.dump(agg.fold(agg.initial(), {f"k{i}": i for i in range(500)})))
    state = agg.fold(state, {"k1": 1})
    files = ShardFiles(tmp_path, fsync=False)
    with pytest.raises(ValueError, match="no base file yet"):
        files.write(7, agg.dump_changes(state), shards=2)
    agg.mark_all_changed(state)
    manifest = files.write(7, agg.dump_changes(state), shards=2)
    assert dict(agg.value(agg.load_documents(files.read(manifest)))) == dict(agg.value(state))
