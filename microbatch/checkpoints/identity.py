"""A file source's position in a checkpoint, and what became of its file when a run resumes.

A :class:`FilePosition` names where reading stopped: a byte offset, and the file it belongs to by a
stamped identity (:class:`FileStamp`), never by its path: device, inode, the size seen, an
``xxh3_128`` of its first bytes (``HEAD_BYTES``); with the offset come an ``xxh3_128`` of the bytes
just before it (``TAIL_BYTES``) and the fingerprint of the whole prefix (:mod:`.prefix`). A
followed file's position also names the files rotated after it that reading had reached, in order
(``pending``): a resume reads them next. Appending to a file changes none of this. On resume
:func:`classify` compares it with the files found now:

- ``"grown"``: the same file, longer than the offset: continue from the offset.
- ``"same"``: the same file, nothing after the offset: nothing new to read.
- ``"rotated"``: the saved file is now a sibling in the same folder (``app.log.1``,
  ``app.log-20260101``...), found by its inode, or by its content for a rotation that copied it
  (``copytruncate``): finish that file from the offset, then the files written after it.
- ``"recreated"`` (followed files only): the saved file is gone and the path names a new file
  (other first bytes), also when the new file reuses the inode: read it from its start, like
  ``tail -F``. A WARNING says so: what the old file held after the offset is lost.
- ``"changed"``: the file's bytes before the offset are not those read (rewritten, edited,
  truncated) and the saved data is nowhere to be found: resuming would skip or repeat data.
  ``error()`` names the file and the first byte range that differs; the way on is a fresh start.
- ``"missing"``: no file at the path and no sibling holds the saved data.

What cannot be recovered: a rotated file that was deleted, or compressed (``app.log.1.gz`` is not
opened), before the resume; data written to a ``copytruncate``d file between the copy and the
truncation. The functions here block; call them from a worker thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import xxhash

from .._exceptions import CheckpointMismatch, InvalidCheckpoint
from .prefix import PrefixHasher, Range, Verify, first_difference

__all__ = [
    "HEAD_BYTES",
    "MAX_SIBLINGS",
    "TAIL_BYTES",
    "FilePosition",
    "FileStamp",
    "FileState",
    "classify",
    "fd_position",
    "fd_stamp",
    "file_position",
    "open_identified",
    "siblings",
]

logger = logging.getLogger("microbatch.sources")

#: How many bytes at the start of a file its stamp hashes.
HEAD_BYTES = 1024
#: How many bytes before the saved offset a position hashes (a quick check before the prefix's).
TAIL_BYTES = 1024
#: The most siblings looked at when searching for a rotated file.
MAX_SIBLINGS = 1000

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_HEX = frozenset("0123456789abcdef")


def _digest(fd: int, start: int, length: int) -> str | None:
    """``xxh3_128`` of ``length`` bytes at ``start`` (hex); ``None`` when the file holds fewer."""
    data = os.pread(fd, length, start) if length else b""
    return xxhash.xxh3_128_hexdigest(data) if len(data) == length else None


def _count(data: dict[str, Any], name: str, field: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidCheckpoint(f"{field}.{name}", f"is {value!r:.60}, not an int >= 0")
    return value


def _hex(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) != 32 or not _HEX.issuperset(value):
        raise InvalidCheckpoint(name, f"is {value!r:.80}, not an xxh3_128 digest in hex")
    return value


@dataclass(frozen=True)
class FileStamp:
    """Which file: ``device`` and ``inode``, the ``size`` seen, the digest of its first
    ``head_length`` bytes (``head``). A file that shrank below ``size``, or whose first bytes
    differ, is another file, also when it has the same inode."""

    device: int
    inode: int
    size: int
    head_length: int
    head: str

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "inode": self.inode, "size": self.size,
                "head_length": self.head_length, "head": self.head}

    @classmethod
    def from_json(cls, data: object, *, field: str = "identity") -> FileStamp:
        """The stamp a checkpoint holds; ``InvalidCheckpoint`` naming ``field.key`` if invalid."""
        if not isinstance(data, dict):
            raise InvalidCheckpoint(field, f"is {data!r:.60}, not a file identity (an object)")
        names = ("device", "inode", "size", "head_length")
        device, inode, size, head_length = (_count(data, n, field) for n in names)
        if head_length > size:
            raise InvalidCheckpoint(f"{field}.head_length", "is larger than the size seen")
        return cls(device, inode, size, head_length, _hex(data.get("head"), f"{field}.head"))

    def matches(self, fd: int) -> bool:
        """Whether the open file ``fd`` is this file: same device and inode, as long, same first bytes."""
        st = os.fstat(fd)
        return ((st.st_dev, st.st_ino) == (self.device, self.inode) and st.st_size >= self.size
                and _digest(fd, 0, self.head_length) == self.head)

    def copied(self, fd: int) -> bool:
        """Whether ``fd`` holds a copy of this file: as long, same first bytes (none: no copy)."""
        return (self.head_length > 0 and os.fstat(fd).st_size >= self.size
                and _digest(fd, 0, self.head_length) == self.head)


@dataclass(frozen=True)
class FilePosition:
    """Where a file source stopped: ``offset`` in the file ``file``, with the digest of the
    ``tail_length`` bytes before it (``tail``), the fingerprint of ``[0, offset)`` (``ranges``,
    see :mod:`.prefix`) and, for a followed file, the files rotated after it that are still to be
    read, oldest first (``pending``). JSON data in a checkpoint (:meth:`to_json`)."""

    file: FileStamp
    offset: int
    tail_length: int
    tail: str
    ranges: tuple[Range, ...] = ()
    pending: tuple[FileStamp, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {**self.file.to_json(), "offset": self.offset, "tail_length": self.tail_length,
                "tail": self.tail, "ranges": [list(r) for r in self.ranges],
                "pending": [p.to_json() for p in self.pending]}

    @classmethod
    def from_json(cls, data: object, *, field: str = "identity") -> FilePosition:
        """The position a checkpoint holds; ``InvalidCheckpoint`` naming ``field.key`` if invalid."""
        stamp = FileStamp.from_json(data, field=field)
        assert isinstance(data, dict)
        offset, tail_length = _count(data, "offset", field), _count(data, "tail_length", field)
        if tail_length > offset:
            raise InvalidCheckpoint(f"{field}.tail_length", "is larger than the offset it ends at")
        if offset > stamp.size:
            raise InvalidCheckpoint(f"{field}.offset", "is past the size seen")
        ranges, pending = data.get("ranges", []), data.get("pending", [])
        if not isinstance(ranges, list) or not isinstance(pending, list):
            raise InvalidCheckpoint(f"{field}.ranges", "ranges and pending must be lists")
        checked: list[Range] = []
        for i, item in enumerate(ranges):
            name = f"{field}.ranges[{i}]"
            if not (isinstance(item, list) and len(item) == 3):
                raise InvalidCheckpoint(name, f"is {item!r:.60}, not [start, end, digest]")
            start, end = item[0], item[1]
            low = checked[-1][1] if checked else 0
            if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)) or not (
                low <= start < end <= offset
            ):
                raise InvalidCheckpoint(name, f"is {item!r:.60}, not an ordered range within [0, {offset})")
            checked.append((start, end, _hex(item[2], name)))
        stamps = tuple(FileStamp.from_json(p, field=f"{field}.pending[{i}]") for i, p in enumerate(pending))
        tail = _hex(data.get("tail"), f"{field}.tail")
        return cls(stamp, offset, tail_length, tail, tuple(checked), stamps)

    def holds(self, fd: int) -> bool:
        """Whether ``fd`` holds this position's bytes around the offset (head and tail digests)."""
        st = os.fstat(fd)
        return (st.st_size >= self.offset and _digest(fd, 0, self.file.head_length) == self.file.head
                and _digest(fd, self.offset - self.tail_length, self.tail_length) == self.tail)


def fd_stamp(fd: int, *, size: int | None = None) -> FileStamp:
    """The stamp of the open file ``fd`` (``size``: the size it had when read, else its size now)."""
    st = os.fstat(fd)
    size = st.st_size if size is None else min(size, st.st_size)
    head_length = min(HEAD_BYTES, size)
    head = _digest(fd, 0, head_length)
    if head is None:  # pragma: no cover - the file shrank between fstat and read
        raise ValueError("the file shrank while its identity was read")
    return FileStamp(st.st_dev, st.st_ino, size, head_length, head)


def fd_position(
    fd: int,
    offset: int,
    *,
    where: str = "the file",
    verify: Verify = "full",
    hasher: PrefixHasher | None = None,
    pending: Sequence[FileStamp] = (),
) -> FilePosition:
    """The position ``offset`` in the open file ``fd``: for a reader that keeps a file open after it
    was renamed (a rotation), whose path now names another file. ``where`` names it in errors;
    ``hasher`` keeps the prefix's digests between calls (see :mod:`.prefix`)."""
    st = os.fstat(fd)
    if st.st_size < offset:
        raise ValueError(f"{where} holds {st.st_size} bytes, fewer than the offset {offset}")
    stamp = fd_stamp(fd)
    tail_length = min(TAIL_BYTES, offset)
    tail = _digest(fd, offset - tail_length, tail_length)
    if tail is None:  # pragma: no cover - the file shrank between fstat and read
        raise ValueError(f"{where} shrank while its identity was read")
    ranges = (hasher or PrefixHasher()).ranges(fd, offset, verify)
    return FilePosition(stamp, offset, tail_length, tail, ranges, tuple(pending))


def file_position(path: str | os.PathLike[str], offset: int, **options: Any) -> FilePosition:
    """The position ``offset`` in the file at ``path`` (see :func:`fd_position`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_position(fd, offset, where=os.fspath(path), **options)
    finally:
        os.close(fd)


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


def _open_if(name: str, test: Any) -> IO[bytes] | None:
    try:
        f = open(name, "rb", buffering=0)  # returned open: closed by the caller
    except OSError:
        return None
    try:
        if test(f.fileno()):
            return f
    except OSError:
        pass
    f.close()
    return None


def open_identified(
    path: str, stamp: FileStamp, position: FilePosition | None = None, *, copies: bool = False
) -> tuple[IO[bytes], str] | None:
    """Open the file ``stamp`` names, wherever it is now (``path`` or a sibling), and its name then.

    The file is recognised on the open file itself (inode, size, first bytes; with ``position``
    also the bytes before its offset), so a rename between the search and the open is harmless.
    With ``copies``, a file with another inode holding ``position``'s bytes, or without
    ``position`` the stamp's size and first bytes (a ``copytruncate`` copy), counts too. ``None``
    when none does.
    """
    names = [path, *siblings(path)]
    for name in names:
        f = _open_if(name, lambda fd: stamp.matches(fd) and (position is None or position.holds(fd)))
        if f is not None:
            return f, name
    if copies:
        for name in names:
            f = _open_if(name, stamp.copied if position is None else position.holds)
            if f is not None:
                return f, name
    return None


Kind = Literal["grown", "same", "rotated", "recreated", "changed", "missing"]


@dataclass(frozen=True)
class FileState:
    """What :func:`classify` found: ``kind``, the ``path`` that held the saved data then (the
    sibling when ``rotated``), its ``size`` now, ``why`` (what differs) and the saved ``position``."""

    kind: Kind
    path: str
    offset: int
    size: int = 0
    why: str = ""
    position: FilePosition | None = None

    def error(self) -> CheckpointMismatch:
        """The refusal to resume for ``changed`` or ``missing`` (or ``rotated`` where a rotation
        cannot be followed, without ``follow``), naming the file and what differs."""
        return CheckpointMismatch(
            f"the input changed: {self.why}. Resuming from byte offset {self.offset} would skip or "
            f"repeat records. Pass fresh=True to Pipeline.run (--fresh on the command line) to start "
            f"over from the start of the file"
        )


def _compare(path: str, saved: FilePosition) -> tuple[bool, bool, int, bool]:
    """(same inode, same bytes around the offset, size now, same first bytes) of the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        head = _digest(fd, 0, saved.file.head_length) == saved.file.head
        same_inode = (st.st_dev, st.st_ino) == (saved.file.device, saved.file.inode)
        return same_inode, saved.holds(fd), st.st_size, head
    finally:
        os.close(fd)


def _compare_or_none(path: str, saved: FilePosition) -> tuple[bool, bool, int, bool] | None:
    try:
        return _compare(path, saved)
    except OSError:  # removed or unreadable since it was listed
        return None


def _verified(state: FileState, saved: FilePosition) -> FileState:
    """``state`` when its file still holds the saved prefix's fingerprint, else ``"changed"``."""
    try:
        fd = os.open(state.path, os.O_RDONLY)
    except OSError:
        return state  # gone since: opening it to read reports that
    try:
        differs = first_difference(fd, saved.ranges)
    finally:
        os.close(fd)
    if differs is None:
        return state
    why = (f"bytes {differs[0]}-{differs[1]} of {state.path} differ from those read before "
           f"(edited or rewritten before the offset {saved.offset})")
    return FileState("changed", state.path, saved.offset, state.size, why, saved)


def classify(path: str | os.PathLike[str], saved: FilePosition, *, follow: bool = False) -> FileState:
    """What became of the file a checkpoint read up to ``saved.offset`` (see the module's docstring).

    The file at ``path`` is kept when it is the saved file (same inode, same bytes around the
    offset), or a copy of it. Otherwise the siblings are searched, first for the saved inode with
    the saved bytes (a rename), then for the saved bytes alone (a copy). The file kept is then
    checked against the prefix's fingerprint. ``follow``: a new file at the path is
    ``"recreated"`` rather than ``"changed"``.
    """
    path = os.fspath(path)
    offset = saved.offset
    here: tuple[bool, bool, int, bool] | None
    try:
        here = _compare(path, saved)
    except FileNotFoundError:
        here = None
    def kept(kind: Kind, name: str, size: int, why: str = "") -> FileState:
        return _verified(FileState(kind, name, offset, size, why, saved), saved)

    if here is not None and here[0] and here[1]:
        return kept("grown" if here[2] > offset else "same", path, here[2])
    candidates = [(name, found) for name in siblings(path) if (found := _compare_or_none(name, saved))]
    rotated = f"{path} was rotated: the data read before is now in "
    for sibling, (same_inode, same_content, size, _) in candidates:
        if same_inode and same_content:
            return kept("rotated", sibling, size, f"{rotated}{sibling} (renamed)")
    if here is not None and here[1]:
        return kept("grown" if here[2] > offset else "same", path, here[2])
    for sibling, (_, same_content, size, _) in candidates:
        if same_content:
            return kept("rotated", sibling, size, f"{rotated}{sibling} (copied)")
    looked = f"; no file beside it ({len(candidates)} looked at) holds the data read before"
    if here is None:
        return FileState("missing", path, offset, 0, f"{path} is missing{looked}", saved)
    same_inode, _, size, same_head = here
    if follow and not same_head:
        why = f"{path} is a new file (other first bytes{', same inode' if same_inode else ''}){looked}"
        logger.warning("%s: reading it from its start; what the old file held after byte %d is lost",
                       why, offset)
        return FileState("recreated", path, offset, size, why, saved)
    inode = "" if same_inode else f"{path} is another file (inode {saved.file.inode} became a new one); "
    why = f"{path} holds {size} bytes, fewer than the {offset} already read (truncated or rewritten)"
    if size >= offset:
        state = _verified(FileState("same", path, offset, size, "", saved), saved)
        around = f"the bytes of {path} around byte offset {offset} differ"
        why = state.why if state.kind == "changed" else around
    return FileState("changed", path, offset, size, f"{inode}{why}{looked}", saved)
