"""A file's identity in a checkpoint, and what became of the file when a run resumes.

A checkpoint of a file source records where reading stopped (a byte offset) and which file that
offset belongs to: its device and inode, a SHA-256 of its first bytes (``HEAD_BYTES``, 1 KiB) and a
SHA-256 of the bytes just before the offset (``TAIL_BYTES``, 1 KiB). Appending to a file changes
none of them. On resume :func:`classify` compares them with the file found now:

- ``"grown"``: the same file, longer than the offset: continue from the offset.
- ``"same"``: the same file, nothing after the offset: nothing new to read.
- ``"rotated"``: the saved file is now a sibling in the same folder (``app.log.1``,
  ``app.log-20260101``...), found by its inode, or by its checksums for a rotation that copied it
  (``copytruncate``): finish that file from the offset, then read the file at the path from its
  start.
- ``"changed"``: the file at the path is not the saved one (rewritten, truncated, replaced) and the
  saved one is nowhere to be found: resuming would skip or repeat data. ``error()`` says what
  differs; the way on is a fresh start.
- ``"missing"``: no file at the path and no sibling holds the saved data.

What cannot be recovered: a rotated file that was deleted, or compressed (``app.log.1.gz`` is not
opened), before the resume; data written to a ``copytruncate``d file between the copy and the
truncation. The functions here block (``stat`` and two 1 KiB reads per file); call them from a
worker thread.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .._exceptions import CheckpointMismatch, InvalidCheckpoint

__all__ = [
    "HEAD_BYTES",
    "MAX_SIBLINGS",
    "TAIL_BYTES",
    "FileIdentity",
    "FileState",
    "classify",
    "fd_identity",
    "file_identity",
    "siblings",
]

#: How many bytes at the start of a file its identity hashes.
HEAD_BYTES = 1024
#: How many bytes before the saved offset the identity hashes.
TAIL_BYTES = 1024
#: The most siblings looked at when searching for a rotated file.
MAX_SIBLINGS = 1000

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")


@dataclass(frozen=True)
class FileIdentity:
    """Which file a saved offset belongs to (see the module's docstring); JSON data in a checkpoint."""

    device: int
    inode: int
    offset: int
    head_length: int
    head: str
    tail_length: int
    tail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, *, field: str = "identity") -> FileIdentity:
        """Read the identity a checkpoint holds; ``InvalidCheckpoint`` naming ``field.key`` if invalid."""
        if not isinstance(data, dict):
            raise InvalidCheckpoint(field, f"is {data!r:.60}, not a file identity (an object)")
        values: dict[str, Any] = {}
        for name in ("device", "inode", "offset", "head_length", "tail_length"):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidCheckpoint(f"{field}.{name}", f"is {value!r:.60}, not an int >= 0")
            values[name] = value
        for name in ("head", "tail"):
            value = data.get(name)
            if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
                raise InvalidCheckpoint(f"{field}.{name}", f"is {value!r:.80}, not a SHA-256 in hex")
            values[name] = value
        if values["tail_length"] > values["offset"]:
            raise InvalidCheckpoint(f"{field}.tail_length", "is larger than the offset it ends at")
        return cls(**values)


def _sha256(fd: int, start: int, length: int) -> str | None:
    """SHA-256 of ``length`` bytes at ``start``; ``None`` when the file holds fewer."""
    data = os.pread(fd, length, start) if length else b""
    if len(data) < length:
        return None
    return hashlib.sha256(data).hexdigest()


def file_identity(
    path: str | os.PathLike[str], offset: int, *, head_bytes: int = HEAD_BYTES, tail_bytes: int = TAIL_BYTES
) -> FileIdentity:
    """The identity of the file at ``path`` read up to ``offset`` (call it when saving a checkpoint).

    Raises ``OSError`` when the file cannot be opened and ``ValueError`` naming the file when it
    holds fewer than ``offset`` bytes.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_identity(fd, offset, where=os.fspath(path), head_bytes=head_bytes, tail_bytes=tail_bytes)
    finally:
        os.close(fd)


def fd_identity(
    fd: int,
    offset: int,
    *,
    where: str = "the file",
    head_bytes: int = HEAD_BYTES,
    tail_bytes: int = TAIL_BYTES,
) -> FileIdentity:
    """The identity of the open file ``fd`` read up to ``offset``: for a reader that keeps a file open
    after it was renamed (a rotation), whose path now names another file. ``where`` names it in errors."""
    st = os.fstat(fd)
    if st.st_size < offset:
        raise ValueError(f"{where} holds {st.st_size} bytes, fewer than the offset {offset}")
    head_length = min(head_bytes, st.st_size)
    tail_length = min(tail_bytes, offset)
    head = _sha256(fd, 0, head_length)
    tail = _sha256(fd, offset - tail_length, tail_length)
    if head is None or tail is None:  # pragma: no cover - the file shrank between fstat and read
        raise ValueError(f"{where} shrank while its identity was read")
    return FileIdentity(st.st_dev, st.st_ino, offset, head_length, head, tail_length, tail)


Kind = Literal["grown", "same", "rotated", "changed", "missing"]


@dataclass(frozen=True)
class FileState:
    """What :func:`classify` found: ``kind``, the ``path`` that holds the saved data (the sibling
    when ``rotated``), its ``size`` now, and ``why`` (what differs, for ``rotated``, ``changed``
    and ``missing``)."""

    kind: Kind
    path: str
    offset: int
    size: int = 0
    why: str = ""

    def error(self) -> CheckpointMismatch:
        """The refusal to resume for ``changed`` or ``missing`` (or ``rotated`` where a rotation
        cannot be followed, without ``follow``), naming the file and what differs."""
        return CheckpointMismatch(
            f"the input changed: {self.why}. Resuming from byte offset {self.offset} would skip or "
            f"repeat records. Pass fresh=True to Pipeline.run (--fresh on the command line) to start "
            f"over from the start of the file"
        )


def _compare(path: str, saved: FileIdentity) -> tuple[bool, bool, int, str]:
    """(same inode, same content up to the offset, size, what differs) for the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        same_inode = (st.st_dev, st.st_ino) == (saved.device, saved.inode)
        if st.st_size < saved.offset:
            return same_inode, False, st.st_size, (
                f"{path} holds {st.st_size} bytes, fewer than the {saved.offset} already read "
                f"(truncated or rewritten)"
            )
        if _sha256(fd, 0, saved.head_length) != saved.head:
            return same_inode, False, st.st_size, f"the first {saved.head_length} bytes of {path} differ"
        start = saved.offset - saved.tail_length
        if _sha256(fd, start, saved.tail_length) != saved.tail:
            return same_inode, False, st.st_size, (
                f"the {saved.tail_length} bytes of {path} before byte offset {saved.offset} differ"
            )
        return same_inode, True, st.st_size, ""
    finally:
        os.close(fd)


def _compare_or_none(path: str, saved: FileIdentity) -> tuple[bool, bool, int, str] | None:
    try:
        return _compare(path, saved)
    except OSError:  # removed or unreadable since it was listed
        return None


def siblings(path: str | os.PathLike[str]) -> list[str]:
    """Files beside ``path`` that a rotation may have made of it, the most recently changed first:
    ``NAME.1``, ``NAME-20260101``, ``NAME_old``... Compressed ones (``.gz`` and the like) are left out."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found: list[tuple[float, str]] = []
    for entry in entries:
        name = entry.name
        if name == base or not name.startswith(base) or name[len(base)] not in ".-_":
            continue
        if name.endswith(_COMPRESSED):
            continue
        try:
            if entry.is_file():
                found.append((entry.stat().st_mtime, entry.path))
        except OSError:
            continue
    found.sort(key=lambda item: (-item[0], item[1]))
    return [p for _, p in found[:MAX_SIBLINGS]]


def classify(path: str | os.PathLike[str], saved: FileIdentity) -> FileState:
    """What became of the file a checkpoint read up to ``saved.offset`` (see the module's docstring).

    The file at ``path`` is kept when its content up to the offset is the saved one (same inode, or
    a copy with a new inode). Otherwise the siblings are searched, first for the saved inode with
    the saved content (a rename), then for the saved content alone (a copy).
    """
    path = os.fspath(path)
    offset = saved.offset
    here: tuple[bool, bool, int, str] | None
    try:
        here = _compare(path, saved)
    except FileNotFoundError:
        here = None
    if here is not None and here[0] and here[1]:
        return FileState("grown" if here[2] > offset else "same", path, offset, here[2])
    candidates = [
        (sibling, found) for sibling in siblings(path) if (found := _compare_or_none(sibling, saved))
    ]
    rotated = f"{path} was rotated: the data read before is now in "
    for sibling, (same_inode, same_content, size, _) in candidates:
        if same_inode and same_content:
            return FileState("rotated", sibling, offset, size, f"{rotated}{sibling} (renamed)")
    if here is not None and here[1]:
        return FileState("grown" if here[2] > offset else "same", path, offset, here[2])
    for sibling, (_, same_content, size, _) in candidates:
        if same_content:
            return FileState("rotated", sibling, offset, size, f"{rotated}{sibling} (copied)")
    looked = f"; no file beside it ({len(candidates)} looked at) holds the data read before"
    if here is None:
        return FileState("missing", path, offset, 0, f"{path} is missing{looked}")
    same_inode, _, size, why = here
    inode = "" if same_inode else f"{path} is another file (inode {saved.inode} became a new one); "
    return FileState("changed", path, offset, size, f"{inode}{why}{looked}")
