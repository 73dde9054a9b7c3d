"""Checkpoints: the format, two atomic stores (a folder, a SQLite file) and fingerprint checks.

A checkpoint is one record — format version, pipeline fingerprint, batches folded, records folded,
source position, aggregator state, dead-letter file length, whether the run finished — serialized
as JSON with a SHA-256 checksum of its canonical JSON body. It is data only: loading a checkpoint
parses JSON and never runs code (no pickle). The checksum detects corruption (a torn write, a
flipped bit, a truncated file); it is not a signature against deliberate tampering.

Both stores are synchronous and thread-safe enough to be called through ``anyio.to_thread.run_sync``
one call at a time. They keep the newest ``keep`` checkpoints (default 3), so that a corrupt newest
checkpoint falls back to the previous one, which ``load`` reports (``logging`` warning and the
``skipped`` attribute) rather than silently resetting.

Checkpoints are ordered by ``batches``: the newest is the one with the most batches folded. Saving a
checkpoint replaces one with the same number and removes those numbered above it (they were skipped
as invalid by ``load``, or belong to a run that was abandoned).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .._exceptions import CheckpointCorrupt, CheckpointError, CheckpointMismatch, CheckpointWriteError

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointStore",
    "DirectoryStore",
    "SqliteStore",
    "open_store",
    "check_fingerprint",
    "encode",
    "decode",
]

logger = logging.getLogger("microbatch.checkpoint")

#: The checkpoint format this version of microbatch writes and reads.
FORMAT_VERSION = 1
_MAGIC = "microbatch-checkpoint"

#: JSON-compatible data (dict with str keys, list, str, int, float, bool, None).
JSON = Any


@dataclass(frozen=True)
class Checkpoint:
    """What a pipeline needs to resume: everything folded up to batch ``batches``, and where to read on.

    ``batches`` is the number of batches folded, which is also the number of the next batch;
    ``records`` the number of records they held; ``position`` where the source resumes (a byte
    offset for a file, a record count for an iterable, ``None`` when the source cannot resume);
    ``state`` the aggregator's ``dump``; ``dead_letters`` the byte length of the dead-letter file
    (cut back to it on resume); ``fingerprint`` what identifies the pipeline (fn, aggregator,
    source...); ``finished`` whether the source was read to its end; ``created`` the
    ``time.time()`` of the save; ``version`` the format version.
    """

    batches: int
    records: int
    position: JSON
    state: JSON
    dead_letters: int = 0
    fingerprint: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    created: float = field(default_factory=time.time)
    version: int = FORMAT_VERSION


def _canonical(data: JSON) -> bytes:
    # Python writes the shortest repr of a float, which reads back bit for bit, so the text is the
    # same after a load; NaN and infinities use Python's JSON extension (NaN, Infinity).
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode(checkpoint: Checkpoint) -> bytes:
    """Serialize a checkpoint as one line of JSON: a header, then the body, then a newline.

    The layout is ``{"format":"microbatch-checkpoint","sha256":"<hex>","body":<body>}``, where
    ``<body>`` is the canonical JSON of the checkpoint's fields (sorted keys, no spaces) and
    ``<hex>`` its SHA-256, so a reader checks the bytes before it parses them. Raises ``TypeError``
    naming the field when the position, state or fingerprint is not JSON data.
    """
    # Not dataclasses.asdict: it deep-copies the state, seconds for a state of a million keys.
    body = {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}
    try:
        canonical = _canonical(body)
    except (TypeError, ValueError) as exc:
        bad = [name for name in ("position", "state", "fingerprint") if not _is_json(body[name])]
        raise TypeError(f"checkpoint field {' and '.join(bad) or '?'} is not JSON-compatible data: {exc}") \
            from None
    digest = hashlib.sha256(canonical).hexdigest()
    return _HEADER % digest.encode("ascii") + canonical + b"}\n"


_HEADER = b'{"format":"' + _MAGIC.encode("ascii") + b'","sha256":"%s","body":'
_HEADER_RE = re.compile(rb'\{"format":"' + _MAGIC.encode("ascii") + rb'","sha256":"([0-9a-f]{64})","body":')


def _is_json(value: JSON) -> bool:
    try:
        _canonical(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"field {name!r} is {value!r:.60}, not an int >= 0")
    return value


def _why_not_a_checkpoint(data: bytes) -> str:
    if not data:
        return "empty file: not a checkpoint (a crash before its first byte was written)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte offset {exc.start}): not a checkpoint"
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at character {exc.pos}): not a checkpoint"
    return f"JSON without the {_MAGIC!r} header: not a checkpoint"


def decode(data: bytes) -> Checkpoint:
    """Verify and parse a serialized checkpoint; ``ValueError`` saying what is wrong when it is invalid.

    The checksum is verified on the raw bytes before any parsing, and only JSON is ever parsed:
    a pickle, garbage, a truncated or altered file is refused without being interpreted.
    """
    match = _HEADER_RE.match(data)
    if match is None:
        raise ValueError(_why_not_a_checkpoint(data))
    stripped = data.rstrip(b"\r\n")
    if not stripped.endswith(b"}"):
        raise ValueError(f"truncated: {len(data)} bytes, the end of the checkpoint is missing")
    raw = stripped[match.end() : -1]
    if hashlib.sha256(raw).hexdigest() != match.group(1).decode("ascii"):
        raise ValueError("checksum mismatch: the content changed after it was written (or was cut short)")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # pragma: no cover - checksum passed
        raise ValueError(f"checksummed body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("the body is not a JSON object")
    version = body.get("version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(
                f"format version {version} is newer than this microbatch reads ({FORMAT_VERSION}): "
                f"upgrade microbatch"
            )
        raise ValueError(f"unknown format version {version!r:.60}")
    fingerprint = body.get("fingerprint")
    if not isinstance(fingerprint, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fingerprint.items()
    ):
        raise ValueError("field 'fingerprint' is not a mapping of str to str")
    created = body.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise ValueError(f"field 'created' is {created!r:.60}, not a time")
    if not isinstance(body.get("finished"), bool):
        raise ValueError("field 'finished' is not a bool")
    if "position" not in body or "state" not in body:
        raise ValueError("no 'position' or no 'state' field")
    return Checkpoint(
        batches=_check_int(body, "batches"),
        records=_check_int(body, "records"),
        position=body["position"],
        state=body["state"],
        dead_letters=_check_int(body, "dead_letters"),
        fingerprint=dict(fingerprint),
        finished=body["finished"],
        created=float(created),
        version=version,
    )


@runtime_checkable
class CheckpointStore(Protocol):
    """Where a pipeline keeps its checkpoints. All methods block; call them from a worker thread.

    ``location`` names the store in messages; ``skipped`` lists ``(where, why)`` for every invalid
    checkpoint the last ``load`` passed over.
    """

    location: str
    skipped: list[tuple[str, str]]

    def load(self) -> Checkpoint | None:
        """Return the newest valid checkpoint, ``None`` when there is none; ``CheckpointCorrupt``
        when checkpoints exist but none is valid."""
        ...

    def save(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint atomically; ``CheckpointWriteError`` leaves the previous one intact."""
        ...

    def clear(self) -> None:
        """Remove every checkpoint (a deliberate fresh start)."""
        ...

    def close(self) -> None:
        """Release the store's resources; the store cannot be used after."""
        ...


def _check_keep(keep: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__qualname__}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (checkpoints kept), got {keep}")
    return keep


def _report(location: str, skipped: list[tuple[str, str]], where: str, why: str) -> None:
    skipped.append((where, why))
    logger.warning("microbatch: skipping invalid checkpoint %s: %s", where, why)


def _none_valid(location: str, skipped: list[tuple[str, str]]) -> CheckpointCorrupt:
    reasons = "; ".join(f"{where}: {why}" for where, why in skipped)
    return CheckpointCorrupt(
        f"no valid checkpoint in {location} ({len(skipped)} invalid: {reasons}). Move the store aside "
        f"to keep it for inspection, or pass fresh=True to Pipeline.run (--fresh on the command line) "
        f"to discard it and start over"
    )


class _WriterLock:
    """An exclusive ``flock`` on a lock file, so that one run at a time writes a store.

    The operating system releases it when the file is closed or the process dies (also by
    ``kill -9``), so a crashed run never leaves a stale lock. Where ``fcntl`` is missing (Windows)
    there is no lock.
    """

    def __init__(self, path: Path, location: str) -> None:
        self.path = path
        self.location = location
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot create the lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.location} is in use by another run (pid {holder}): two runs writing one "
                f"checkpoint store would overwrite each other's checkpoints. Wait for it to end, or "
                f"give this run its own checkpoint location"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_NAME = re.compile(r"^checkpoint-(\d{12,})\.json$")
_TEMP_PREFIX = ".checkpoint-"
_TEMP_SUFFIX = ".tmp"


class DirectoryStore:
    """Checkpoints as files in a folder, written atomically: ``checkpoint-000000000042.json``.

    Each ``save`` writes a temporary file made with ``tempfile.mkstemp`` in the folder, flushes and
    ``fsync``s it, ``os.replace``s it onto its final name (named after ``batches``, zero-padded so
    that names sort by number), ``fsync``s the folder so that the rename is durable, then removes
    all but the newest ``keep`` checkpoints. A crash at any step leaves either the previous
    checkpoint or the new one in place, never a torn one; temporary files a crash left behind are
    removed when a store is opened on the folder. The folder is created by the first ``save``.

    Any ``OSError`` while saving (a full disk, a failed ``fsync``, a read-only folder) raises
    ``CheckpointWriteError`` naming the folder and the cause; the temporary file is removed and the
    previous checkpoint stays as it was.

    One writer per folder at a time: a run calls ``lock()`` first, and a second run on the same
    folder gets a ``CheckpointError`` instead of overwriting the first one's checkpoints.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.path = Path(path)
        self.keep = _check_keep(keep)
        self.location = str(self.path)
        self.skipped: list[tuple[str, str]] = []
        #: Temporary files left by an earlier crash and removed by ``lock()``.
        self.removed_temporaries: list[str] = []
        self._writer = _WriterLock(self.path / ".lock", self.location)

    def lock(self) -> None:
        """Become the one writer of this folder; then remove temporary files a crash left behind.

        Raises ``CheckpointError`` naming the folder while another run holds it. Reading
        (``load``, ``microbatch inspect``) needs no lock. ``close()`` releases it.
        """
        self._writer.acquire()
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(_TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                        self.removed_temporaries.append(entry.name)

    def __repr__(self) -> str:
        return f"DirectoryStore({self.location!r}, keep={self.keep})"

    def _numbered(self) -> list[tuple[int, Path]]:
        """The checkpoint files, newest (highest number) first."""
        try:
            entries = list(self.path.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _NAME.match(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
        found.sort(reverse=True)
        return found

    def load(self) -> Checkpoint | None:
        """Return the newest valid checkpoint, or ``None`` when the folder holds none (or is missing).

        Invalid newer files (not JSON, truncated, wrong checksum, a newer format) are each reported
        with a ``logging`` warning and listed in ``skipped``; the newest valid one is returned.
        Raises ``CheckpointCorrupt`` naming the folder when checkpoint files exist but none is valid.
        """
        self.skipped = []
        numbered = self._numbered()
        for number, file in numbered:
            try:
                data = file.read_bytes()
            except OSError as exc:
                _report(self.location, self.skipped, str(file), f"cannot be read: {exc}")
                continue
            try:
                checkpoint = decode(data)
            except ValueError as exc:
                _report(self.location, self.skipped, str(file), str(exc))
                continue
            if checkpoint.batches != number:
                _report(self.location, self.skipped, str(file),
                        f"holds batch {checkpoint.batches}, not the {number} of its name")
                continue
            return checkpoint
        if numbered:
            raise _none_valid(self.location, self.skipped)
        return None

    def save(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint`` atomically as the newest; prune to the newest ``keep``.

        Raises ``CheckpointWriteError`` (the previous checkpoint intact) on any ``OSError``, and
        ``TypeError`` when the checkpoint holds data that JSON cannot.
        """
        data = encode(checkpoint)
        final = self.path / f"checkpoint-{checkpoint.batches:012d}.json"
        tmp: str | None = None
        fd: int | None = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=self.path)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:  # pragma: no cover - os.write raises rather than return 0
                    raise OSError(errno.EIO, "write returned 0")
                view = view[written:]
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, final)
            tmp = None
            _fsync_dir(self.path)
        except OSError as exc:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise CheckpointWriteError(
                f"cannot write a checkpoint in {self.location}: {exc.strerror or exc} "
                f"({type(exc).__name__}, errno {exc.errno}); the previous checkpoint is intact. "
                f"Free space or fix the folder's permissions, then run again to resume"
            ) from exc
        self._prune(checkpoint.batches)

    def _prune(self, saved: int) -> None:
        # Best effort: a checkpoint left over is harmless, so a failure here is only logged.
        older = 0
        for number, file in self._numbered():
            if number == saved:
                continue
            if number < saved:
                older += 1
                if older < self.keep:
                    continue
            try:
                file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("microbatch: cannot remove old checkpoint %s: %s", file, exc)

    def clear(self) -> None:
        """Remove every checkpoint and temporary file of the folder (the folder itself stays)."""
        for _, file in self._numbered():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(_TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
        self.skipped = []

    def close(self) -> None:
        """Release the writer lock, if held; every other call opens and closes its own files."""
        self._writer.release()

    def __enter__(self) -> DirectoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteStore:
    """Checkpoints as rows of a SQLite file (standard ``sqlite3``), one transaction per save.

    The database runs in WAL journal mode with ``synchronous=FULL``, so a committed checkpoint
    survives a power cut and a crash mid-save leaves the previous one. Each row holds the same
    checksummed JSON as a checkpoint file, verified on load. Like :class:`DirectoryStore` it keeps
    the newest ``keep`` checkpoints (default 3) and reports invalid rows in ``skipped``.

    The file (and its folder) is created when the store opens. Raises ``CheckpointCorrupt`` when
    the file is not a SQLite database, ``CheckpointWriteError`` when a save fails (a full disk,
    ``SQLITE_FULL``, a read-only file); the transaction is rolled back and the previous checkpoint
    stays. Calls are serialized by a lock, so any thread may use the store.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.path = Path(path)
        self.keep = _check_keep(keep)
        self.location = str(self.path)
        self.skipped: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._writer = _WriterLock(self.path.with_name(self.path.name + ".lock"), self.location)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise CheckpointWriteError(f"cannot open the checkpoint database {self.location}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS microbatch_checkpoints ("
                "batches INTEGER PRIMARY KEY, body BLOB NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise CheckpointCorrupt(
                f"{self.location} is not a usable SQLite checkpoint database: {exc}. Move it aside or "
                f"point checkpoint= at another file"
            ) from exc

    def __repr__(self) -> str:
        return f"SqliteStore({self.location!r}, keep={self.keep})"

    def load(self) -> Checkpoint | None:
        """Return the newest valid checkpoint, or ``None`` when the table is empty.

        Invalid rows are reported (``logging`` warning, ``skipped``) and passed over; when rows exist
        but none is valid, raises ``CheckpointCorrupt`` naming the file.
        """
        with self._lock:
            self.skipped = []
            try:
                rows = self._conn.execute(
                    "SELECT batches, body FROM microbatch_checkpoints ORDER BY batches DESC"
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                raise CheckpointCorrupt(f"cannot read checkpoints from {self.location}: {exc}") from exc
            for number, body in rows:
                where = f"{self.location} (row batches={number})"
                try:
                    checkpoint = decode(bytes(body) if not isinstance(body, str) else body.encode("utf-8"))
                except ValueError as exc:
                    _report(self.location, self.skipped, where, str(exc))
                    continue
                if checkpoint.batches != number:
                    _report(self.location, self.skipped, where, f"holds batch {checkpoint.batches}")
                    continue
                return checkpoint
            if rows:
                raise _none_valid(self.location, self.skipped)
            return None

    def save(self, checkpoint: Checkpoint) -> None:
        """Store ``checkpoint`` in one transaction with the pruning; ``CheckpointWriteError`` on failure."""
        data = encode(checkpoint)
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute(
                        "DELETE FROM microbatch_checkpoints WHERE batches >= ?", (checkpoint.batches,)
                    )
                    self._conn.execute(
                        "INSERT INTO microbatch_checkpoints (batches, body) VALUES (?, ?)",
                        (checkpoint.batches, data),
                    )
                    self._conn.execute(
                        "DELETE FROM microbatch_checkpoints WHERE batches NOT IN "
                        "(SELECT batches FROM microbatch_checkpoints ORDER BY batches DESC LIMIT ?)",
                        (self.keep,),
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                raise CheckpointWriteError(
                    f"cannot write a checkpoint in {self.location}: {exc} ({type(exc).__name__}); "
                    f"the previous checkpoint is intact. Free space or fix the file's permissions, "
                    f"then run again to resume"
                ) from exc

    def clear(self) -> None:
        """Remove every checkpoint row (the file stays)."""
        with self._lock:
            try:
                self._conn.execute("DELETE FROM microbatch_checkpoints")
            except sqlite3.Error as exc:
                raise CheckpointWriteError(f"cannot clear the checkpoints in {self.location}: {exc}") from exc
            self.skipped = []

    def lock(self) -> None:
        """Become the one writer of this database (a ``.lock`` file beside it); see DirectoryStore."""
        self._writer.acquire()

    def close(self) -> None:
        """Close the database connection and release the writer lock, if held."""
        with self._lock:
            self._conn.close()
        self._writer.release()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def is_sqlite_target(target: object) -> bool:
    """Whether ``checkpoint=target`` names a SQLite store (a path ending in .sqlite, .sqlite3, .db)."""
    if not isinstance(target, (str, os.PathLike)):
        return False
    path = os.fspath(target)
    return isinstance(path, str) and path.lower().endswith(_SQLITE_SUFFIXES)


def open_store(target: str | os.PathLike[str] | CheckpointStore, *, keep: int = 3) -> CheckpointStore:
    """Return the store for ``checkpoint=``: a store as is; a path ending in ``.sqlite``,
    ``.sqlite3`` or ``.db`` as a :class:`SqliteStore`; any other path as a :class:`DirectoryStore`.

    ``keep`` (default 3) applies to the stores this function opens. Raises ``TypeError`` for
    anything else.
    """
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        if isinstance(path, bytes):
            raise TypeError("checkpoint= must be a str path, a path-like object or a checkpoint store")
        if is_sqlite_target(path):
            return SqliteStore(path, keep=keep)
        return DirectoryStore(path, keep=keep)
    if isinstance(target, CheckpointStore):
        return target
    raise TypeError(
        f"checkpoint= must be a folder path, a .sqlite/.sqlite3/.db file path or a checkpoint store, "
        f"got {type(target).__qualname__}"
    )


def check_fingerprint(saved: dict[str, str], current: dict[str, str], *, location: str) -> None:
    """Raise ``CheckpointMismatch`` listing every key whose saved and current values differ.

    A key present on one side only counts as a difference (shown as ``(absent)``). The message says
    how to start fresh: ``fresh=True`` on ``Pipeline.run`` or ``--fresh`` on the command line.
    """
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if not differing:
        return

    def show(d: dict[str, str], k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"

    details = "; ".join(f"{k}: saved {show(saved, k)}, now {show(current, k)}" for k in differing)
    raise CheckpointMismatch(
        f"the checkpoint in {location} belongs to another pipeline ({', '.join(differing)} differ: "
        f"{details}). Resuming would mix two computations. Pass fresh=True to Pipeline.run (or --fresh "
        f"on the command line) to discard the checkpoint and start over, or use another checkpoint location"
    )
