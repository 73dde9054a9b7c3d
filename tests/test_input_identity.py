"""A file's identity in a checkpoint, and what became of it by the resume: real files, real rotations."""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
from pathlib import Path

import pytest

from microbatch import CheckpointMismatch
from microbatch._exceptions import InvalidCheckpoint
from microbatch.checkpoints.format import Checkpoint, decode, encode
from microbatch.checkpoints.identity import FileIdentity, classify, fd_identity, file_identity, siblings


def lines(start: int, stop: int) -> str:
    return "".join(f"{i}\n" for i in range(start, stop))


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "app.log"
    path.write_text(lines(0, 1000))
    return path


def test_the_same_file_grown_or_not(log: Path) -> None:
    saved = file_identity(log, log.stat().st_size)
    state = classify(log, saved)
    assert (state.kind, state.path, state.offset) == ("same", str(log), saved.offset)
    with log.open("a") as f:
        f.write(lines(1000, 1100))
    state = classify(log, saved)
    assert state.kind == "grown" and state.size == log.stat().st_size > saved.offset


def test_an_identity_in_the_middle_of_a_file(log: Path) -> None:
    offset = len(lines(0, 500).encode())
    saved = file_identity(log, offset)
    assert saved.head_length == 1024 and saved.tail_length == 1024
    assert classify(log, saved).kind == "grown"
    empty = file_identity(log, 0)
    assert empty.tail_length == 0 and classify(log, empty).kind == "grown"
    with pytest.raises(ValueError, match=f"{log} holds .* fewer than the offset"):
        file_identity(log, log.stat().st_size + 1)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "the first 1024 bytes of"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2] + b"Z\n"), "before byte offset"),
        (lambda p: p.write_text(lines(0, 10)), "fewer than the"),
    ],
    ids=["head-rewritten", "bytes-before-offset-rewritten", "truncated"],
)
def test_a_rewritten_or_shorter_file_is_refused(log: Path, damage: object, why: str) -> None:
    saved = file_identity(log, log.stat().st_size)
    damage(log)  # type: ignore[operator]
    state = classify(log, saved)
    assert state.kind == "changed" and why in state.why and str(log) in state.why
    error = state.error()
    assert isinstance(error, CheckpointMismatch)
    assert "the input changed" in str(error) and str(log) in str(error) and "--fresh" in str(error)


def test_a_file_replaced_by_another_is_refused_and_by_a_copy_continues(log: Path, tmp_path: Path) -> None:
    saved = file_identity(log, log.stat().st_size)
    os.link(log, tmp_path / "keep")  # the saved inode stays in use: no new file can get its number
    copy = tmp_path / "copy.tmp"
    shutil.copyfile(log, copy)
    with copy.open("a") as f:
        f.write(lines(1000, 1010))
    os.replace(copy, log)  # a new inode, the same data then more
    assert os.stat(log).st_ino != saved.inode
    assert classify(log, saved).kind == "grown"
    other = tmp_path / "other.tmp"
    other.write_text(lines(5000, 6000))
    os.replace(other, log)
    state = classify(log, saved)
    assert state.kind == "changed" and "is another file" in state.why


def test_an_open_file_keeps_its_identity_after_a_rename(log: Path, tmp_path: Path) -> None:
    with log.open("rb") as f:
        log.rename(tmp_path / "app.log.1")
        log.write_text(lines(3000, 4000))
        saved = fd_identity(f.fileno(), 500, where=str(log))
    assert saved == file_identity(tmp_path / "app.log.1", 500)
    state = classify(log, saved)
    assert state.kind == "rotated" and state.path == str(tmp_path / "app.log.1")


def test_the_rotation_of_the_issue_finds_the_old_file(log: Path, tmp_path: Path) -> None:
    # seq 0 999 > app.log; checkpoint; seq 1000 1999 >> app.log; mv app.log app.log.1; seq 2000 3999 > app.log
    saved = file_identity(log, log.stat().st_size)
    with log.open("a") as f:
        f.write(lines(1000, 2000))
    log.rename(tmp_path / "app.log.1")
    log.write_text(lines(2000, 4000))
    state = classify(log, saved)
    assert state.kind == "rotated" and state.path == str(tmp_path / "app.log.1")
    assert state.size == len(lines(0, 2000).encode())
    rotated = tmp_path / "app.log.1"
    assert state.why == f"{log} was rotated: the data read before is now in {rotated} (renamed)"
    with open(state.path, "rb") as f:  # what the pipeline reads next: the rest of the old file
        f.seek(state.offset)
        assert f.read().decode() == lines(1000, 2000)


def test_copytruncate_is_found_by_content(log: Path, tmp_path: Path) -> None:
    saved = file_identity(log, len(lines(0, 600).encode()))
    shutil.copyfile(log, tmp_path / "app.log-20261130")
    with log.open("r+") as f:
        f.truncate(0)
    log.write_text(lines(7000, 7100))
    state = classify(log, saved)
    assert state.kind == "rotated" and state.path == str(tmp_path / "app.log-20261130")
    assert state.why.endswith("(copied)")


def test_a_deleted_or_compressed_rotation_cannot_be_recovered(log: Path, tmp_path: Path) -> None:
    saved = file_identity(log, log.stat().st_size)
    log.rename(tmp_path / "app.log.1.gz")  # a compressed rotation is not opened
    state = classify(log, saved)
    assert state.kind == "missing" and f"{log} is missing" in state.why
    assert "no file beside it (0 looked at)" in state.why
    log.write_text(lines(10, 20))
    assert classify(log, saved).kind == "changed"


def test_siblings_most_recent_first(tmp_path: Path) -> None:
    base = tmp_path / "app.log"
    names = ["app.log.2", "app.log.1", "app.log-2026", "app.log_old", "app.logger", "x.log"]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "app.log.3.gz").write_text("z")
    assert [Path(p).name for p in siblings(base)] == ["app.log_old", "app.log-2026", "app.log.1", "app.log.2"]


def test_rotating_file_handler_rotations_are_followed(tmp_path: Path) -> None:
    """A real RotatingFileHandler rotates the file three times after the checkpoint."""
    path = tmp_path / "service.log"
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=20_000, backupCount=5)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test_rotation")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        n = 0
        while path.stat().st_size < 12_000:
            logger.info("record %06d", n)
            n += 1
        handler.flush()
        offset = path.stat().st_size
        read_so_far = path.read_bytes()
        saved = file_identity(path, offset)
        rotations = 0
        while rotations < 3:
            before = path.stat().st_ino
            logger.info("record %06d", n)
            n += 1
            rotations += path.stat().st_ino != before
        handler.flush()
    finally:
        logger.removeHandler(handler)
        handler.close()
    state = classify(path, saved)
    assert state.kind == "rotated" and state.path == f"{path}.3"
    data = Path(state.path).read_bytes()
    assert data[:offset] == read_so_far and len(data) > offset


# --- in the checkpoint -----------------------------------------------------------------------------


def test_identity_round_trips_through_a_checkpoint(log: Path) -> None:
    saved = file_identity(log, 300)
    checkpoint = Checkpoint(batches=2, records=20, position=300, state=None, identity=saved.to_json())
    loaded = decode(encode(checkpoint))
    assert FileIdentity.from_json(loaded.identity) == saved
    assert decode(encode(Checkpoint(batches=0, records=0, position=0, state=None))).identity is None
    with pytest.raises(InvalidCheckpoint, match="field 'identity'"):
        decode(encode(Checkpoint(batches=2, records=2, position=2, state=None, identity="app.log")))


@pytest.mark.parametrize(
    "key, value",
    [("inode", -1), ("inode", "12"), ("offset", True), ("head", "abc"), ("tail", 5), ("tail_length", 10**9)],
)
def test_an_invalid_identity_names_its_field(log: Path, key: str, value: object) -> None:
    data = file_identity(log, 300).to_json()
    data[key] = value
    with pytest.raises(InvalidCheckpoint) as info:
        FileIdentity.from_json(data)
    assert info.value.field == f"identity.{key}"
    with pytest.raises(InvalidCheckpoint, match="field 'identity' is 'x'"):
        FileIdentity.from_json("x")
