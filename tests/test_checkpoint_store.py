"""Checkpoint stores: atomic saves, pruning, corruption fallback, pickle refusal, crashes at every step."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microbatch import CheckpointCorrupt, CheckpointError, CheckpointMismatch, CheckpointWriteError
from microbatch._core.fingerprint import check_fingerprint
from microbatch.checkpoints.directory import DirectoryStore
from microbatch.checkpoints.format import Checkpoint, decode, encode
from microbatch.checkpoints.sqlite import SqliteStore
from microbatch.checkpoints.store import CheckpointStore
from microbatch.checkpoints.targets import open_store

REPO = Path(__file__).resolve().parent.parent


def cp(batches: int, state: Any = None, **kw: Any) -> Checkpoint:
    return Checkpoint(
        batches=batches, records=batches * 10, position=batches * 100,
        state={"sum": batches} if state is None else state, dead_letters=0,
        fingerprint={"fn": "jobs.parse", "aggregate": "Sum()"}, **kw,
    )


@pytest.fixture(params=["dir", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make(kind: str, tmp_path: Path, keep: int = 3) -> CheckpointStore:
    return DirectoryStore(tmp_path / "state", keep=keep) if kind == "dir" \
        else SqliteStore(tmp_path / "state.sqlite", keep=keep)


@pytest.fixture
def store(kind: str, tmp_path: Path) -> Iterator[CheckpointStore]:
    s = make(kind, tmp_path)
    yield s
    s.close()


def overwrite(store: CheckpointStore, batches: int, data: bytes) -> None:
    """Replace the stored bytes of checkpoint ``batches`` behind the store's back."""
    if isinstance(store, DirectoryStore):
        (store.path / f"checkpoint-{batches:012d}.json").write_bytes(data)
    else:
        assert isinstance(store, SqliteStore)
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE microbatch_checkpoints SET body = ? WHERE batches = ?", (data, batches))


def stored(store: CheckpointStore) -> list[int]:
    if isinstance(store, DirectoryStore):
        return sorted(int(p.name[11:23]) for p in store.path.glob("checkpoint-*.json"))
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store.path) as conn:
        return [r[0] for r in conn.execute("SELECT batches FROM microbatch_checkpoints ORDER BY batches")]


def test_round_trip(store: CheckpointStore) -> None:
    assert store.load() is None
    saved = cp(7, state={"counts": {"a": 1}, "x": [0.1, 1e-300, -0.0]}, finished=True)
    store.save(saved)
    loaded = store.load()
    assert loaded == saved
    assert json.dumps(loaded.state) == json.dumps(saved.state)  # -0.0 and every float bit for bit
    assert store.skipped == []


def test_missing_folder_is_none_and_created_on_save(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "a" / "b")
    assert store.load() is None
    assert not (tmp_path / "a").exists()
    store.save(cp(1))
    assert store.load() == cp(1, created=store.load().created)  # type: ignore[union-attr]


def test_keep_prunes_to_newest(kind: str, tmp_path: Path) -> None:
    store = make(kind, tmp_path, keep=2)
    for n in range(1, 6):
        store.save(cp(n))
    assert stored(store) == [4, 5]
    store.save(cp(5, state={"sum": 55}))  # same number: replaced
    assert stored(store) == [4, 5]
    assert store.load().state == {"sum": 55}  # type: ignore[union-attr]
    store.save(cp(3))  # a run that resumed from 3: the later ones are dropped
    assert stored(store) == [3]
    store.clear()
    assert store.load() is None and stored(store) == []
    store.close()


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be at least 1"):
        DirectoryStore(tmp_path, keep=0)
    with pytest.raises(TypeError, match="keep must be an int"):
        SqliteStore(tmp_path / "x.db", keep="3")  # type: ignore[arg-type]


def test_stale_temporary_files_removed_by_the_writer(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    DirectoryStore(folder).save(cp(1))
    stale = folder / ".checkpoint-abc123.tmp"
    stale.write_bytes(b'{"body": half')
    other = folder / "notes.txt"
    other.write_text("mine")
    reader = DirectoryStore(folder)
    assert stale.exists()  # a reader (inspect) never touches a running writer's files
    store = DirectoryStore(folder)
    store.lock()
    assert not stale.exists() and other.exists()
    assert store.removed_temporaries == [stale.name]
    assert store.load() is not None and reader.load() is not None
    store.close()


@pytest.mark.parametrize("kind", ["folder", "sqlite"])
def test_one_writer_at_a_time(tmp_path: Path, kind: str) -> None:
    target = tmp_path / ("state" if kind == "folder" else "state.sqlite")
    first = open_store(target)
    first.lock()  # type: ignore[attr-defined]
    second = open_store(target)
    with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        second.lock()  # type: ignore[attr-defined]
    assert second.load() is None  # reading needs no lock
    first.close()
    second.lock()  # type: ignore[attr-defined]
    second.save(cp(1))
    second.close()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b"\x00\xff garbage \x13", "not UTF-8"),
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:120] + b[130:], "checksum mismatch"),
        (lambda b: b.replace(b'"sum":3', b'"sum":4'), "checksum mismatch"),
        (lambda b: b"[1, 2, 3]", "header"),
        (lambda b: b"", "empty file"),
        (lambda b: b"{not json", "not valid JSON"),
    ],
    ids=["garbage", "truncated", "bytes-missing", "bad-checksum", "other-json", "empty", "not-json"],
)
def test_corrupt_newest_falls_back_and_is_reported(
    store: CheckpointStore, damage: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(cp(2))
    store.save(cp(3))
    good = encode(cp(3))
    overwrite(store, 3, damage(good))
    with caplog.at_level(logging.WARNING, logger="microbatch.checkpoint"):
        loaded = store.load()
    assert loaded is not None and loaded.batches == 2
    [(where, why)] = store.skipped
    assert reason in why
    name = "checkpoint-000000000003.json" if isinstance(store, DirectoryStore) else "batches=3"
    assert name in where
    assert any(where in rec.getMessage() and reason in rec.getMessage() for rec in caplog.records)


def test_all_corrupt_raises_naming_the_store(store: CheckpointStore) -> None:
    store.save(cp(1))
    store.save(cp(2))
    overwrite(store, 1, b"junk")
    overwrite(store, 2, encode(cp(2))[:-20])
    with pytest.raises(CheckpointCorrupt) as info:
        store.load()
    message = str(info.value)
    assert store.location in message and "2 invalid" in message and "fresh=True" in message
    store.save(cp(3))  # a fresh save still works and becomes the newest
    assert store.load().batches == 3  # type: ignore[union-attr]


def test_newer_format_version_is_refused_with_upgrade_hint(store: CheckpointStore) -> None:
    store.save(cp(1))
    store.save(cp(2))
    overwrite(store, 2, encode(cp(2, version=99)))
    assert store.load().batches == 1  # type: ignore[union-attr]
    assert "upgrade microbatch" in store.skipped[0][1]


class _Payload:
    """Unpickling this creates the file at ``path``: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_payload_is_rejected_without_running(store: CheckpointStore, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(str(probe)))).close()
    assert probe.exists()  # the payload is live: unpickling it does create a file

    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(str(marker)))
    store.save(cp(4))
    store.save(cp(5))
    overwrite(store, 5, payload)
    assert store.load().batches == 4  # type: ignore[union-attr]
    assert not marker.exists()
    overwrite(store, 4, pickle.dumps({"batches": 4}, protocol=0))  # an ASCII pickle is refused too
    with pytest.raises(CheckpointCorrupt):
        store.load()
    assert not marker.exists()


@pytest.mark.parametrize("fail", ["write", "fsync"])
def test_full_disk_or_failed_fsync_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    store = DirectoryStore(tmp_path / "state")
    store.save(cp(1))

    def broken(*args: Any) -> Any:
        raise OSError(errno.ENOSPC if fail == "write" else errno.EIO, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, fail, broken)
    with pytest.raises(CheckpointWriteError) as info:
        store.save(cp(2))
    monkeypatch.undo()
    message = str(info.value)
    assert str(tmp_path / "state") in message and "No space left on device" in message
    assert "previous checkpoint is intact" in message
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["checkpoint-000000000001.json"]
    assert DirectoryStore(tmp_path / "state").load() == store.load()
    assert store.load().batches == 1  # type: ignore[union-attr]


def test_sqlite_full_database_keeps_previous(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.save(cp(1))
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(CheckpointWriteError) as info:
        store.save(cp(2, state={"big": "x" * 200_000}))
    assert str(tmp_path / "state.db") in str(info.value) and "full" in str(info.value)
    assert store.load().batches == 1  # type: ignore[union-attr]
    store.close()
    with SqliteStore(tmp_path / "state.db") as again:
        assert again.load().batches == 1  # type: ignore[union-attr]
        assert again._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_store_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CheckpointCorrupt, match=r"state\.sqlite is not a usable SQLite"):
        SqliteStore(path)


def test_unwritable_folder_is_a_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointWriteError, match="cannot write a checkpoint in"):
        DirectoryStore(blocker / "state").save(cp(1))


def test_open_store_picks_by_suffix(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "state"), DirectoryStore)
    for name in ("a.sqlite", "b.SQLITE3", "c.db"):
        s = open_store(str(tmp_path / name), keep=5)
        assert isinstance(s, SqliteStore) and s.keep == 5
        s.close()
    own = DirectoryStore(tmp_path / "x")
    assert open_store(own) is own
    with pytest.raises(TypeError, match="checkpoint= must be"):
        open_store(42)  # type: ignore[arg-type]


def test_fingerprint_mismatch_lists_every_difference() -> None:
    check_fingerprint({"fn": "a", "source": "x"}, {"fn": "a", "source": "x"}, location="state/")
    with pytest.raises(CheckpointMismatch) as info:
        check_fingerprint(
            {"fn": "jobs.parse", "aggregate": "Sum()", "source": "a.txt", "old": "1", "mode": "x"},
            {"fn": "jobs.parse", "aggregate": "TopK(k=10)", "source": "b.txt", "new": "2", "mode": "y"},
            location="state/",
        )
    message = str(info.value)
    assert "state/" in message
    for part in ("the aggregator changed: Sum() -> TopK(k=10)", "the input changed: a.txt -> b.txt",
                 "mode changed: x -> y", "fresh=True", "--fresh"):
        assert part in message
    # A key on one side only is unknown (written by another version), not a change.
    for absent in ("fn changed", "fn's code", "old changed", "new changed", "(absent)"):
        assert absent not in message


def test_encode_refuses_non_json_state() -> None:
    with pytest.raises(TypeError, match="state"):
        encode(cp(1, state={"s": {1, 2}}))
    with pytest.raises(ValueError, match="checksum"):
        decode(encode(cp(1)).replace(b'"records":10', b'"records":11'))


# --- crashes in the middle of a save, in a real process -------------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from microbatch.checkpoints.directory import DirectoryStore
    from microbatch.checkpoints.format import Checkpoint
    from microbatch.checkpoints.sqlite import SqliteStore

    kind, path, step = sys.argv[1:4]
    store = DirectoryStore(path) if kind == "dir" else SqliteStore(path)

    def cp(n):
        return Checkpoint(batches=n, records=n, position=n, state={"n": n, "pad": "x" * 50000},
                          dead_letters=0, fingerprint={"fn": "f"})

    store.save(cp(1))
    calls = {"fsync": 0}

    def after(original, name, when=1):
        def patched(*args):
            result = original(*args)
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == when:
                os._exit(17)
            return result
        return patched

    if step == "mid-write":
        real_write = os.write
        def half(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))
            os._exit(17)
        os.write = half
    elif step == "after-write":
        os.write = after(os.write, "write")
    elif step == "after-fsync":
        os.fsync = after(os.fsync, "fsync")
    elif step == "after-rename":
        os.replace = after(os.replace, "replace")
    elif step == "after-dir-fsync":
        os.fsync = after(os.fsync, "fsync", when=2)
    elif step in ("before-commit", "after-commit"):
        real = store._conn
        class Crashing:
            def execute(self, sql, *args):
                if sql == "COMMIT" and step == "before-commit":
                    os._exit(17)
                result = real.execute(sql, *args)
                if sql == "COMMIT":
                    os._exit(17)
                return result
        store._conn = Crashing()
    store.save(cp(2))
    sys.exit("the crash was not injected")
    """
)


@pytest.mark.parametrize(
    "kind, step, expected, temp_left",
    [
        ("dir", "mid-write", 1, True),
        ("dir", "after-write", 1, True),
        ("dir", "after-fsync", 1, True),
        ("dir", "after-rename", 2, False),
        ("dir", "after-dir-fsync", 2, False),
        ("sqlite", "before-commit", 1, False),
        ("sqlite", "after-commit", 2, False),
    ],
)
def test_crash_at_each_step_of_a_save(
    tmp_path: Path, kind: str, step: str, expected: int, temp_left: bool
) -> None:
    target = tmp_path / ("state" if kind == "dir" else "state.sqlite")
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), kind, str(target), step],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 17, done.stderr
    if kind == "dir":
        temps = list(target.glob(".checkpoint-*.tmp"))
        assert bool(temps) == temp_left
        store: CheckpointStore = DirectoryStore(target)
        store.lock()  # the next writer removes what the crashed one left
        assert not list(target.glob(".checkpoint-*.tmp"))
    else:
        store = SqliteStore(target)
    loaded = store.load()
    assert loaded is not None and loaded.batches == expected and loaded.state["n"] == expected
    assert store.skipped == []
    store.save(Checkpoint(batches=3, records=3, position=3, state={}, fingerprint={}))
    assert store.load().batches == 3  # type: ignore[union-attr]
    store.close()


LOOP_SCRIPT = textwrap.dedent(
    """
    import sys
    from microbatch.checkpoints.directory import DirectoryStore
    from microbatch.checkpoints.format import Checkpoint
    from microbatch.checkpoints.sqlite import SqliteStore

    kind, path = sys.argv[1:3]
    store = DirectoryStore(path, keep=2) if kind == "dir" else SqliteStore(path, keep=2)
    n = (store.load() or Checkpoint(0, 0, 0, None)).batches
    while True:
        n += 1
        store.save(Checkpoint(batches=n, records=n, position=n, state={"n": n, "pad": "y" * 200000},
                              dead_letters=0, fingerprint={"fn": "f"}))
        print(n, flush=True)
    """
)


def test_sigkill_during_repeated_saves_always_leaves_a_valid_checkpoint(kind: str, tmp_path: Path) -> None:
    """Kill -9 a process that saves in a loop, six times; each time the newest save it reported loads."""
    target = tmp_path / ("state" if kind == "dir" else "state.sqlite")
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    last = 0
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), kind, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        for _ in range(1 + round_ % 3):  # kill after a varying number of completed saves
            last = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        store = make(kind, tmp_path, keep=2)
        loaded = store.load()
        assert loaded is not None and loaded.batches >= last and loaded.state["n"] == loaded.batches
        assert store.skipped == []
        store.close()

