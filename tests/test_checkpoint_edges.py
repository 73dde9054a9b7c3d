"""Checkpoints at their edges: whose dead letters, a deleted shard folder, crafted manifests, strict
loading, a source without describe(), file modes whatever the umask. Real files, real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import microbatch as mb

pytestmark = pytest.mark.anyio


def sum_or_fail(lines: list[str]) -> int:
    if "bad" in lines:
        raise ValueError("a bad record")
    return sum(int(line) for line in lines)


def _letters(path: Path) -> list[str]:
    return [json.loads(line)["record"] for line in path.read_text().splitlines()]


# --- the dead-letter file belongs to the checkpoint ------------------------------------------------


async def test_sqlite_checkpoints_keep_their_own_dead_letters_and_a_resume_cuts_only_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("1\nbad\n2\n")
    (tmp_path / "b.txt").write_text("3\nbad\nbad\n4\n")
    pipeline = mb.Pipeline(sum_or_fail, aggregate=mb.Sum(), max_size=2, executor="inline", retries=0)
    assert await pipeline.run(mb.read_lines("a.txt"), checkpoint="a.sqlite") == 3
    assert await pipeline.run(mb.read_lines("b.txt"), checkpoint="b.sqlite") == 7
    a_dead, b_dead = tmp_path / "a.sqlite.dead-letters.jsonl", tmp_path / "b.sqlite.dead-letters.jsonl"
    assert _letters(a_dead) == ["bad"] and _letters(b_dead) == ["bad", "bad"]
    assert not (tmp_path / "dead-letters.jsonl").exists()
    b_before = b_dead.read_bytes()
    # A again: it resumes from its finished checkpoint and cuts back its own file, not B's
    assert await pipeline.run(mb.read_lines("a.txt"), checkpoint="a.sqlite") == 3
    assert b_dead.read_bytes() == b_before
    assert _letters(a_dead) == ["bad"]


async def test_store_objects_name_their_own_dead_letter_file(tmp_path: Path) -> None:
    from microbatch.checkpoints.session import dead_letter_path

    folder, db = mb.DirectoryStore(tmp_path / "state"), mb.SqliteStore(tmp_path / "s.db")
    try:
        assert dead_letter_path(None, folder) == str(tmp_path / "state" / "dead-letters.jsonl")
        assert dead_letter_path(None, db) == str(tmp_path / "s.db") + ".dead-letters.jsonl"
        assert dead_letter_path(None, str(tmp_path / "s.db")) == dead_letter_path(None, db)
        assert dead_letter_path(tmp_path / "mine.jsonl", db) == str(tmp_path / "mine.jsonl")
        assert dead_letter_path(None, None) == "dead-letters.jsonl"
    finally:
        db.close()


# --- keyed state's shard files -------------------------------------------------------------------


def count_users(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        out[line] = out.get(line, 0) + 1
    return out


def _users(path: Path, n: int) -> Path:
    path.write_text("".join(f"u{(i * 7919) % 300}\n" for i in range(n)))
    return path


def _manifests(state: Path) -> list[dict[str, object]]:
    from microbatch.checkpoints.format import decode

    return [decode(file.read_bytes()).state for file in sorted(state.glob("checkpoint-*.json"))]


def _named_files(manifest: object) -> list[str]:
    from microbatch.checkpoints.shards import _names

    return _names(manifest)


@pytest.mark.parametrize("delete_at", [None, 10])
async def test_every_kept_keyed_checkpoint_names_files_that_exist_even_after_the_folder_was_deleted(
    tmp_path: Path, delete_at: int | None
) -> None:
    """Also without a deletion: the final save replaces the regular one of the same batch, and the
    files of the checkpoints kept before it must stay."""
    import shutil

    src = _users(tmp_path / "users.txt", 3_000)
    state = tmp_path / "state"

    async def sink(seq: int, result: object) -> None:
        # The fold stage calls the sink between saves: no checkpoint is being written now.
        if seq == delete_at:
            shutil.rmtree(state)

    pipeline = mb.Pipeline(
        count_users, aggregate=mb.ByKey(mb.Count(), shards=4), max_size=100, executor="inline",
        checkpoint_every_batches=1, sink=sink,
    )
    await pipeline.run(mb.read_lines(src), checkpoint=state)
    manifests = _manifests(state)
    assert manifests, "checkpoints are written again after the folder was deleted"
    for manifest in manifests:
        assert [name for name in _named_files(manifest) if not (state / "keyed" / name).is_file()] == []
    expected = count_users(src.read_text().splitlines())
    assert dict(await pipeline.run(mb.read_lines(src), checkpoint=state)) == expected


async def test_shard_files_deleted_before_the_final_save_are_written_again_whole_in_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _users(tmp_path / "users.txt", 3_000)  # 30 batches: saves after 7, 14, 21, 28, and the final
    state = tmp_path / "state"

    async def sink(seq: int, result: object) -> None:
        if seq == 29:  # the save after batch 28 is over; the final one comes next
            for file in (state / "keyed").iterdir():
                file.unlink()

    pipeline = mb.Pipeline(
        count_users, aggregate=mb.ByKey(mb.Count(), shards=4), max_size=100, executor="inline",
        checkpoint_every=None, checkpoint_every_batches=7, sink=sink,
    )
    expected = count_users(src.read_text().splitlines())
    assert dict(await pipeline.run(mb.read_lines(src), checkpoint=state)) == expected
    assert "checkpoint at batch 30 not written" in caplog.text
    from microbatch.checkpoints.format import decode

    final = decode(sorted(state.glob("checkpoint-*.json"))[-1].read_bytes())
    assert final.finished and final.batches == 30
    assert [name for name in _named_files(final.state) if not (state / "keyed" / name).is_file()] == []
    assert dict(await pipeline.run(mb.read_lines(src), checkpoint=state)) == expected


def test_a_crafted_manifest_naming_a_path_outside_the_folder_is_refused(tmp_path: Path) -> None:
    from microbatch.checkpoints.shards import ShardFiles

    agg = mb.ByKey(mb.Count(), shards=2)
    files = ShardFiles(tmp_path / "keyed", fsync=False)
    manifest = files.write(1, agg.dump_changes(agg.fold(agg.initial(), {"a": 1, "b": 2})), shards=2)
    entry = manifest["entries"][0]
    for name in ("../../etc/passwd", "/etc/passwd", "sub/shard-0000-000000000001-base.json", ".."):
        crafted = {**manifest, "entries": [{**entry, "base": {**entry["base"], "name": name}},
                                           *manifest["entries"][1:]]}
        with pytest.raises(mb.CheckpointCorrupt, match=r"entries\[0\]\.base\.name"):
            list(files.read(crafted))
    bad_count = {**manifest, "entries": [{**entry, "count": "3"}, *manifest["entries"][1:]]}
    with pytest.raises(mb.CheckpointCorrupt, match=r"entries\[0\]\.count"):
        files.counts(bad_count)


async def test_a_resume_falls_back_past_a_checkpoint_whose_manifest_leaves_the_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from microbatch.checkpoints.format import decode, encode

    src = _users(tmp_path / "users.txt", 1_000)
    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        count_users, aggregate=mb.ByKey(mb.Count(), shards=2), max_size=100, executor="inline",
        checkpoint_every_batches=1,
    )
    expected = dict(await pipeline.run(mb.read_lines(src), checkpoint=state))
    newest = sorted(state.glob("checkpoint-*.json"))[-1]
    cp = decode(newest.read_bytes())
    manifest = json.loads(json.dumps(cp.state))
    manifest["entries"][0]["base"]["name"] = "../../etc/passwd"
    crafted = dataclasses.replace(cp, batches=cp.batches + 1, state=manifest)
    (state / f"checkpoint-{crafted.batches:012d}.json").write_bytes(encode(crafted))
    assert dict(await pipeline.run(mb.read_lines(src), checkpoint=state)) == expected
    assert "entries[0].base.name" in caplog.text and "../../etc/passwd" in caplog.text


# --- loading is strict: a field of the wrong type or range falls back, named ----------------------

_GOOD_SUM = {"int": 12, "partials": [], "special": 0.0, "floats": False}


@pytest.mark.parametrize(
    ("field", "value"),
    [("int", "12"), ("int", 1.5), ("int", True), ("partials", ["1.0"]), ("floats", 1), ("special", 0)],
)
def test_a_sum_state_with_a_wrongly_typed_field_is_refused_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"field '{field}'"):
        mb.Sum().load({**_GOOD_SUM, field: value})
    assert mb.Sum().value(mb.Sum().load(_GOOD_SUM)) == 12


@pytest.mark.parametrize(
    ("agg", "state"),
    [
        (mb.Count(), True),
        (mb.Count(), -1),
        (mb.Count(), "3"),
        (mb.Mean(), {"sum": _GOOD_SUM, "count": "3"}),
        (mb.Mean(), {"sum": _GOOD_SUM, "count": True}),
        (mb.Mean(), {"sum": {**_GOOD_SUM, "int": "12"}, "count": 3}),
        (mb.Min(), True),
        (mb.Max(), float("nan")),
        (mb.ByKey(mb.Sum(), shards=1), {"format": "microbatch.keyed/1", "documents": [
            {"format": "microbatch.keyed/1", "shard": 0, "shards": 1, "kind": "base", "count": "1",
             "keys": ["a"], "states": [3]}]}),
        (mb.ByKey(mb.Count(), shards=1), {"format": "microbatch.keyed/1", "documents": [
            {"format": "microbatch.keyed/1", "shard": 0, "shards": 1, "kind": "base", "count": 1,
             "keys": ["a"], "states": [True]}]}),
    ],
)
def test_aggregator_states_of_the_wrong_type_or_range_are_refused(agg: mb.Aggregator[object, object, object],
                                                                 state: object) -> None:
    with pytest.raises(ValueError):
        agg.load(state)


@pytest.mark.parametrize("bad", [{"int": "12"}, {"int": 1.5}, {"int": True}])
async def test_a_checkpoint_whose_state_has_a_bad_field_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: dict[str, object]
) -> None:
    import dataclasses

    from microbatch.checkpoints.format import decode, encode

    src = tmp_path / "n.txt"
    src.write_text("".join(f"{i}\n" for i in range(100)))
    state = tmp_path / "state"
    pipeline = mb.Pipeline(sum_or_fail, aggregate=mb.Sum(), max_size=10, executor="inline",
                           checkpoint_every_batches=1)
    assert await pipeline.run(mb.read_lines(src), checkpoint=state) == sum(range(100))
    cp = decode(sorted(state.glob("checkpoint-*.json"))[-1].read_bytes())
    crafted = dataclasses.replace(cp, batches=cp.batches + 1, state={**cp.state, **bad})
    (state / f"checkpoint-{crafted.batches:012d}.json").write_bytes(encode(crafted))
    assert await pipeline.run(mb.read_lines(src), checkpoint=state) == sum(range(100))
    [field] = bad
    assert f"field {field!r}" in caplog.text and "field 'state' was refused by Sum().load" in caplog.text


# --- a user source without describe() -------------------------------------------------------------


class Numbers:
    """A source of its own positions, without ``describe()`` (it is optional)."""

    def __init__(self, stop: int, start: int = 0) -> None:
        self.start, self.stop = start, stop

    async def chunks(self):  # type: ignore[no-untyped-def]
        for first in range(self.start, self.stop, 10):
            records = list(range(first, min(first + 10, self.stop)))
            yield mb.Chunk(records, position={"next": records[-1] + 1})

    def resume(self, position: dict[str, int]) -> Numbers:
        return Numbers(self.stop, position["next"])


async def test_a_source_without_describe_resumes_fingerprinted_by_its_class(tmp_path: Path) -> None:
    from microbatch.checkpoints.format import decode

    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        sum, aggregate=mb.Sum(), max_size=10, executor="inline", checkpoint_every_batches=1
    )
    # Left after 3 batches: the final checkpoint covers them (the update decides, not timing).
    async with pipeline.updates(Numbers(100), checkpoint=state) as updates:
        async for update in updates:
            if update.records >= 30:
                break
    newest = decode(sorted(state.glob("checkpoint-*.json"))[-1].read_bytes())
    assert not newest.finished and newest.fingerprint["source"] == "source:Numbers"
    assert newest.records >= 30 and isinstance(newest.position, dict)
    # the same source again resumes after what was folded and ends exact
    assert await pipeline.run(Numbers(100), checkpoint=state) == sum(range(100))


# --- modes: folders 0700, files 0600, whatever the umask -------------------------------------------


def count_or_fail(lines: list[str]) -> dict[str, int]:
    if "bad" in lines:
        raise ValueError("a bad record")
    return count_users(lines)


def _modes(root: Path) -> dict[str, str]:
    paths = [root, *root.rglob("*")]
    return {str(path.relative_to(root)): oct(path.stat().st_mode & 0o777) for path in paths}


@pytest.mark.parametrize("target", ["made/here/state", "made/here/cp.sqlite"])
async def test_checkpoint_folders_are_0700_and_files_0600_under_umask_000(
    tmp_path: Path, target: str
) -> None:
    import os

    src = tmp_path / "users.txt"
    src.write_text("".join(f"u{i % 7}\n" for i in range(200)) + "bad\n")
    pipeline = mb.Pipeline(
        count_or_fail, aggregate=mb.ByKey(mb.Count(), shards=2), max_size=20, executor="inline",
        retries=0, checkpoint_every_batches=1,
    )
    old = os.umask(0)
    try:
        counts = await pipeline.run(mb.read_lines(src), checkpoint=tmp_path / target)
    finally:
        os.umask(old)
    assert counts["u0"] == 29
    made = tmp_path / "made"
    modes = _modes(made)
    assert any(name.endswith("dead-letters.jsonl") for name in modes)
    assert any("keyed" in name and name.endswith(".json") for name in modes)
    wrong = {
        name: mode for name, mode in modes.items()
        if mode != ("0o700" if (made / name).is_dir() else "0o600")
    }
    assert wrong == {}


# --- kill -9 of a SQLite pipeline, another pipeline meanwhile, then the resume ---------------------

_JOB = """
import sys, time
import anyio
import microbatch as mb

def sum_or_fail(lines):
    time.sleep(0.002)
    if "bad" in lines:
        raise ValueError("a bad record")
    return sum(int(line) for line in lines)

async def main(numbers, checkpoint):
    pipeline = mb.Pipeline(sum_or_fail, aggregate=mb.Sum(), max_size=10, executor="inline", retries=0,
                           backoff=0.0, checkpoint_every=None, checkpoint_every_batches=1)
    async with pipeline.updates(mb.read_lines(numbers), checkpoint=checkpoint) as updates:
        async for update in updates:
            print(update.seq, flush=True)
    print("done", updates.value, flush=True)

anyio.run(main, sys.argv[1], sys.argv[2], backend=sys.argv[3])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_sqlite_pipeline_killed_and_resumed_leaves_another_pipelines_dead_letters_alone(
    tmp_path: Path, backend: str
) -> None:
    import signal
    import subprocess
    import sys

    job = tmp_path / "job.py"
    job.write_text(_JOB)
    numbers = tmp_path / "a.txt"
    numbers.write_text("".join("bad\n" if i % 50 == 7 else f"{i}\n" for i in range(3_000)))
    (tmp_path / "b.txt").write_text("".join("bad\n" if i % 10 == 3 else f"{i}\n" for i in range(100)))

    def run(source: str, checkpoint: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(job), source, checkpoint, backend], cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)

    a = run("a.txt", "a.sqlite")
    assert a.stdout is not None
    for _ in range(20):  # batch 20 is folded and checkpointed: dead letters are in A's file
        assert a.stdout.readline()
    a.send_signal(signal.SIGKILL)
    a.wait()
    a.stdout.close()
    b = run("b.txt", "b.sqlite")
    out, _ = b.communicate(timeout=60)
    assert out.splitlines()[-1] == f"done {sum(i for i in range(100) if i % 10 != 3)}"
    b_letters = _letters(tmp_path / "b.sqlite.dead-letters.jsonl")
    assert b_letters == ["bad"] * 10
    a = run("a.txt", "a.sqlite")
    out, _ = a.communicate(timeout=120)
    assert out.splitlines()[-1] == f"done {sum(i for i in range(3_000) if i % 50 != 7)}"
    assert _letters(tmp_path / "b.sqlite.dead-letters.jsonl") == b_letters
    assert _letters(tmp_path / "a.sqlite.dead-letters.jsonl") == ["bad"] * 60  # none twice, none lost
    assert not (tmp_path / "dead-letters.jsonl").exists()


async def test_a_chunk_position_of_the_wrong_type_falls_back_to_the_previous_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from microbatch.checkpoints.format import decode, encode

    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        sum, aggregate=mb.Sum(), max_size=10, executor="inline", checkpoint_every_batches=1
    )
    async with pipeline.updates(Numbers(100), checkpoint=state) as updates:
        async for update in updates:
            if update.records >= 30:
                break  # the final checkpoint covers these batches
    cp = decode(sorted(state.glob("checkpoint-*.json"))[-1].read_bytes())
    crafted = dataclasses.replace(cp, batches=cp.batches + 1, position={**cp.position, "skip": "3"})
    (state / f"checkpoint-{crafted.batches:012d}.json").write_bytes(encode(crafted))
    assert await pipeline.run(Numbers(100), checkpoint=state) == sum(range(100))
    assert "field 'position.skip' is '3'" in caplog.text
