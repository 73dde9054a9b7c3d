"""The checkpoint format: fields, encoding, checksum, versions and validation; no file I/O.

A checkpoint is one record — format version, pipeline fingerprint, batches folded, records folded,
source position, aggregator state, dead-letter file length, whether the run finished — serialized
as JSON with a SHA-256 checksum of its canonical JSON body. It is data only: loading a checkpoint
parses JSON and never runs code (no pickle). The checksum detects corruption (a torn write, a
flipped bit, a truncated file); it is not a signature against deliberate tampering.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from .._exceptions import InvalidCheckpoint

__all__ = [
    "FORMAT_VERSION",
    "JSON",
    "MAX_DEPTH",
    "Checkpoint",
    "PositionKind",
    "check_position",
    "checked",
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
    ``time.time()`` of the save; ``version`` the format version; ``identity`` which input the
    position belongs to (for a file, ``checkpoints.identity.FileIdentity.to_json()``; ``None`` when
    unknown, as in checkpoints of earlier versions).
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
    identity: JSON = None


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
        raise InvalidCheckpoint(name, f"is {value!r:.60}, not an int >= 0")
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
    except RecursionError:
        return "JSON nested too deep to parse: not a checkpoint"
    return f"JSON without the {_MAGIC!r} header: not a checkpoint"


#: The deepest nesting of lists and objects a checkpoint field may hold (the state of an aggregator,
#: a source position). Deeper data is refused before it is parsed, so that a hostile or corrupt
#: checkpoint cannot exhaust the interpreter's recursion limit in the parser or in ``load``.
MAX_DEPTH = 200

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_INNERMOST = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")


def _check_depth(raw: bytes, limit: int) -> None:
    """Refuse a JSON body whose fields nest deeper than ``limit``, naming the field and byte offset.

    The body object itself is one level, so its fields may nest ``limit`` levels below it. The
    common case costs two ``bytes.count`` calls; a body with many brackets is checked by removing
    strings and then, ``limit + 1`` times at most, every innermost pair of brackets (C-speed regular
    expressions, one pass per level). Only a body found too deep is scanned byte by byte, to name
    the field.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit + 1:
        return
    skeleton = _STRING.sub(b'""', raw)
    for _ in range(limit + 1):
        if b"[" not in skeleton and b"{" not in skeleton:
            return
        skeleton = _INNERMOST.sub(b"", skeleton)
    if b"[" not in skeleton and b"{" not in skeleton:
        return
    field, offset = _deepest_field(raw, limit + 1)
    raise InvalidCheckpoint(
        field, f"nests lists or objects more than {limit} levels deep (byte offset {offset} of the body), "
        f"deeper than a checkpoint may hold (MAX_DEPTH={limit}): refused before parsing"
    )


def _deepest_field(raw: bytes, limit: int) -> tuple[str | None, int]:
    """The top-level key under which nesting first passes ``limit``, and the offset where it does."""
    depth, i, n = 0, 0, len(raw)
    key: str | None = None
    last_string = b""
    while i < n:
        c = raw[i]
        if c == 0x22:  # a string: skip it, remembering it in case it is a key
            match = _STRING.match(raw, i)
            end = match.end() if match else n
            last_string = raw[i + 1 : end - 1]
            i = end
            continue
        if c == 0x3A and depth == 1:  # ':' after a key of the body object
            key = last_string.decode("utf-8", "replace")
        elif c in b"[{":
            depth += 1
            if depth > limit:
                return key, i
        elif c in b"]}":
            depth -= 1
        i += 1
    return key, n  # pragma: no cover - only called when the body is too deep


def decode(data: bytes, *, max_depth: int = MAX_DEPTH) -> Checkpoint:
    """Verify and parse a serialized checkpoint; ``InvalidCheckpoint`` saying what is wrong if invalid.

    The checksum is verified on the raw bytes before any parsing, and only JSON is ever parsed:
    a pickle, garbage, a truncated or altered file is refused without being interpreted. Every field
    is checked for its type and range (``InvalidCheckpoint.field`` names the one at fault), and
    fields nested deeper than ``max_depth`` levels (default ``MAX_DEPTH``, 200) are refused before
    parsing. What only the pipeline knows — the kind of position its source resumes from, the
    aggregator's state — is checked by ``check_position`` and the aggregator's ``load``.
    """
    match = _HEADER_RE.match(data)
    if match is None:
        raise InvalidCheckpoint(None, _why_not_a_checkpoint(data))
    stripped = data.rstrip(b"\r\n")
    if not stripped.endswith(b"}"):
        raise InvalidCheckpoint(None, f"truncated: {len(data)} bytes, the end of the checkpoint is missing")
    raw = stripped[match.end() : -1]
    if hashlib.sha256(raw).hexdigest() != match.group(1).decode("ascii"):
        raise InvalidCheckpoint(
            None, "checksum mismatch: the content changed after it was written (or was cut short)"
        )
    _check_depth(raw, max_depth)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidCheckpoint(None, f"checksummed body is not JSON that can be read: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidCheckpoint(None, "the body is not a JSON object")
    version = body.get("version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise InvalidCheckpoint(
                "version",
                f"is {version}, newer than this microbatch reads ({FORMAT_VERSION}): upgrade microbatch",
            )
        raise InvalidCheckpoint("version", f"is {version!r:.60}: an unknown format version")
    return Checkpoint(
        batches=_check_int(body, "batches"),
        records=_check_int(body, "records"),
        position=_present(body, "position"),
        state=_present(body, "state"),
        dead_letters=_check_int(body, "dead_letters"),
        fingerprint=_check_fingerprint_field(body.get("fingerprint")),
        finished=_check_bool(body, "finished"),
        created=_check_created(body.get("created")),
        version=version,
        identity=_check_identity(body.get("identity")),
    )


def _check_identity(value: object) -> JSON:
    # Checked in full by the source that wrote it (checkpoints.identity.FileIdentity.from_json).
    if value is not None and not isinstance(value, dict):
        raise InvalidCheckpoint("identity", f"is {value!r:.60}, not null or an object")
    return value


def _present(body: dict[str, Any], name: str) -> JSON:
    if name not in body:
        raise InvalidCheckpoint(name, "is missing")
    return body[name]


def _check_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise InvalidCheckpoint(name, f"is {value!r:.60}, not a bool")
    return value


def _check_fingerprint_field(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidCheckpoint("fingerprint", f"is {value!r:.60}, not a mapping of str to str")
    return dict(value)


def _check_created(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 0:
        return float(value)
    raise InvalidCheckpoint("created", f"is {value!r:.60}, not a time (seconds since the epoch, >= 0)")


#: How a source resumes, which decides what a checkpoint's ``position`` must be:
#: ``"offset"`` a byte offset (files), ``"count"`` a number of records to skip (iterables),
#: ``"chunk"`` the JSON position a resumable source put in its last chunk, ``"none"`` nothing (TCP).
PositionKind = Literal["offset", "count", "chunk", "none"]


def check_position(checkpoint: Checkpoint, kind: PositionKind) -> JSON:
    """Return ``checkpoint.position`` checked for a source that resumes by ``kind``; ``InvalidCheckpoint``
    naming the field ``position`` otherwise.

    - ``"offset"`` and ``"count"``: an int >= 0 (a bool is refused). ``null`` is accepted, as 0,
      only when no batch was folded; after that it would silently read the input again from its
      start and count it twice. The int is returned.
    - ``"chunk"``: ``{"chunk": <the position of the last whole chunk folded, any JSON>, "skip":
      <records of the next chunk folded, an int >= 0>}``; ``null`` for a chunk source whose chunks
      carry no position (a TCP server), which continues with what arrives next.
    - ``"none"``: the source cannot resume; the position must be ``null``.
    """
    position = checkpoint.position
    if kind in ("offset", "count"):
        what = "a byte offset" if kind == "offset" else "a number of records to skip"
        if position is None:
            if checkpoint.batches == 0 and checkpoint.records == 0:
                return 0
            raise InvalidCheckpoint(
                "position", f"is null after {checkpoint.batches} batches, but this source resumes from "
                f"{what} (an int >= 0): resuming from the start would fold its records twice"
            )
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise InvalidCheckpoint("position", f"is {position!r:.60}, not {what} (an int >= 0)")
        return position
    if kind == "chunk":
        if position is None:
            return None
        if not isinstance(position, dict) or set(position) != {"chunk", "skip"}:
            raise InvalidCheckpoint(
                "position", f"is {position!r:.60}, not a chunk source's position "
                f"({{'chunk': <a chunk's position or null>, 'skip': <records>}})"
            )
        skip = position["skip"]
        if type(skip) is not int or skip < 0:
            raise InvalidCheckpoint("position.skip", f"is {skip!r:.60}, not an int >= 0")
        return position
    if kind == "none":
        if position is not None:
            raise InvalidCheckpoint(
                "position", f"is {position!r:.60}, but this source cannot resume (null expected)"
            )
        return None
    raise ValueError(f"kind must be 'offset', 'count', 'chunk' or 'none', got {kind!r}")


T = TypeVar("T")


def checked(field: str, load: Callable[[JSON], T], value: JSON) -> T:
    """Return ``load(value)``; turn any ``Exception`` it raises into ``InvalidCheckpoint`` naming ``field``.

    For the parts of a checkpoint that another object interprets, e.g.
    ``checked("state", aggregator.load, checkpoint.state)``, so that a store's ``load`` falls back
    to the previous checkpoint with an error naming the field instead of failing the resume.
    """
    try:
        return load(value)
    except InvalidCheckpoint:
        raise
    except Exception as exc:
        owner = getattr(load, "__self__", None)
        describe = getattr(owner, "describe", None)
        who = f"{describe()}.load" if callable(describe) else getattr(load, "__qualname__", "load")
        raise InvalidCheckpoint(field, f"was refused by {who}: {type(exc).__name__}: {exc}") from exc

