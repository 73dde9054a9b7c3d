"""Files deleted under a run or before a resume, and the modes of the files that hold data."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from microbatch import CheckpointError, CheckpointWriteError
from microbatch.checkpoints.deadletters import DeadLetter, DeadLetterFile
from microbatch.checkpoints.directory import DirectoryStore
from microbatch.checkpoints.format import Checkpoint
from microbatch.checkpoints.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent


def cp(batches: int) -> Checkpoint:
    return Checkpoint(batches=batches, records=batches, position=batches, state={"n": batches})


def letter(record: str, batch: int = 0) -> DeadLetter:
    return DeadLetter(record, batch, 0, "ValueError", "bad", "Traceback ...")


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- the dead-letter file --------------------------------------------------------------------------


def test_a_missing_dead_letter_file_is_recreated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out" / "dead.jsonl"
    first = DeadLetterFile(path)
    first.write([letter("a"), letter("b")])
    first.sync()
    length = first.length
    first.close()
    assert length > 0
    path.unlink()
    resumed = DeadLetterFile(path)
    with caplog.at_level(logging.WARNING, logger="microbatch"):
        resumed.truncate_to(length)  # never blocks the resume
    [record] = [r for r in caplog.records if r.name == "microbatch"]
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage() and "earlier dead letters are gone" in record.getMessage()
    assert path.exists() and path.stat().st_size == 0 and mode(path) == 0o600
    resumed.write([letter("c", 5)])
    resumed.close()
    assert path.read_text().count("\n") == 1 and '"c"' in path.read_text()


def test_a_dead_letter_file_is_cut_back_and_a_shorter_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    f = DeadLetterFile(path)
    f.write([letter("a")])
    keep = f.length
    f.write([letter("b")])
    f.close()
    DeadLetterFile(path).truncate_to(keep)
    assert path.stat().st_size == keep
    with pytest.raises(ValueError, match=f"{path} holds {keep} bytes, fewer than"):
        DeadLetterFile(path).truncate_to(keep + 1)


def test_a_missing_dead_letter_file_with_no_letters_recorded_is_not_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dead.jsonl"
    with caplog.at_level(logging.WARNING, logger="microbatch"):
        DeadLetterFile(path).truncate_to(0)
    assert not caplog.records and not path.exists()


def test_dead_letter_files_are_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    f = DeadLetterFile(path)
    f.write([letter("secret record")])
    f.close()
    assert mode(path) == 0o600


# --- the writer lock when the folder is deleted under a run ---------------------------------------


def test_folder_deleted_between_saves_recreates_the_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "state"
    first = DirectoryStore(target)
    first.lock()
    first.save(cp(1))
    shutil.rmtree(target)
    with caplog.at_level(logging.WARNING, logger="microbatch.checkpoint"):
        first.save(cp(2))
    assert "was deleted or replaced while this run held it" in caplog.text
    assert (target / ".lock").exists() and mode(target / ".lock") == 0o600
    second = DirectoryStore(target)
    with pytest.raises(CheckpointError, match="in use by another run"):
        second.lock()
    loaded = second.load()
    assert loaded is not None and loaded.batches == 2
    first.close()
    second.lock()
    second.close()


SECOND_WRITER = textwrap.dedent(
    """
    import sys
    from microbatch.checkpoints.directory import DirectoryStore
    from microbatch.checkpoints.sqlite import SqliteStore
    kind, path = sys.argv[1:3]
    store = DirectoryStore(path) if kind == "dir" else SqliteStore(path)
    store.lock()
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until the test is done
    """
)


def test_another_run_that_took_the_new_lock_stops_the_first(tmp_path: Path) -> None:
    target = tmp_path / "state"
    first = DirectoryStore(target)
    first.lock()
    first.save(cp(1))
    shutil.rmtree(target)
    script = tmp_path / "second.py"
    script.write_text(SECOND_WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), "dir", str(target)], cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        with pytest.raises(CheckpointWriteError, match="another run now holds the new one"):
            first.save(cp(2))
        assert not list(target.glob("checkpoint-*.json"))  # nothing written over the other run's folder
        with pytest.raises(CheckpointWriteError):
            first.save(cp(3))  # and it stays stopped
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        first.close()


def test_sqlite_lock_deleted_is_recreated_and_a_deleted_database_stops_saves(tmp_path: Path) -> None:
    target = tmp_path / "state.sqlite"
    store = SqliteStore(target)
    store.lock()
    store.save(cp(1))
    lock = tmp_path / "state.sqlite.lock"
    lock.unlink()
    store.save(cp(2))
    assert lock.exists()
    other = SqliteStore(target)
    with pytest.raises(CheckpointError, match="in use by another run"):
        other.lock()
    other.close()
    target.unlink()
    with pytest.raises(CheckpointWriteError, match="was deleted or replaced while this run wrote to it"):
        store.save(cp(3))
    store.close()


# --- modes of the files that hold data -------------------------------------------------------------


def test_sqlite_store_and_lock_files_are_0600(tmp_path: Path) -> None:
    target = tmp_path / "state.sqlite"
    store = SqliteStore(target)
    store.lock()
    store.save(cp(1))
    for path in (target, Path(f"{target}-wal"), Path(f"{target}-shm"), Path(f"{target}.lock")):
        assert path.exists(), path
        assert mode(path) == 0o600, (path, oct(mode(path)))
    store.close()


def test_directory_lock_is_0600_also_when_an_older_run_made_it_0644(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()
    (target / ".lock").write_text("123")
    os.chmod(target / ".lock", 0o644)
    store = DirectoryStore(target)
    store.lock()
    assert mode(target / ".lock") == 0o600
    store.save(cp(1))
    assert mode(target / "checkpoint-000000000001.json") == 0o600
    store.close()
