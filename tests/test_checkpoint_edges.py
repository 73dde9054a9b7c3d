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
