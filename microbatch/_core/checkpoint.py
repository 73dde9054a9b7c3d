"""Checkpoints: the format (fields, checksum, validation) and fingerprint checks; no file I/O.

A checkpoint is one record — format version, pipeline fingerprint, batches folded, records folded,
source position, aggregator state, dead-letter file length, whether the run finished — serialized
as JSON with a SHA-256 checksum of its canonical JSON body. It is data only: loading a checkpoint
parses JSON and never runs code (no pickle). The checksum detects corruption (a torn write, a
flipped bit, a truncated file); it is not a signature against deliberate tampering.

The stores that keep checkpoints (a folder, a SQLite file) live in ``microbatch.stores``; the
names ``CheckpointStore``, ``DirectoryStore``, ``SqliteStore``, ``open_store`` and
``is_sqlite_target`` are still importable from here for older imports.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .._exceptions import CheckpointMismatch

if TYPE_CHECKING:
    from ..stores import CheckpointStore, DirectoryStore, SqliteStore, is_sqlite_target, open_store

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointStore",
    "DirectoryStore",
    "SqliteStore",
    "open_store",
    "is_sqlite_target",
    "check_fingerprint",
    "encode",
    "decode",
]

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


_MOVED = frozenset({"CheckpointStore", "DirectoryStore", "SqliteStore", "is_sqlite_target", "open_store"})


def __getattr__(name: str) -> Any:
    # The stores do file I/O and moved to microbatch.stores; they are imported from there on first
    # use, which also keeps this module free of an import cycle (the stores import the format).
    if name in _MOVED:
        from .. import stores

        return getattr(stores, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
