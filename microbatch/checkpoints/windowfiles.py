"""Window files: the open windows of a keyed ``Windows`` state, one binary file per window.

A checkpoint of keyed time windows (``Windows(ByKey(...), size=...)``) holds a small JSON
*manifest* in place of the whole state::

    {"format": "microbatch.windows-manifest/1", "seq": 1200,
     "state": {"format": "microbatch.windows/1", "top": 1700000123, "emitted": 84000, "late": 3},
     "windows": [{"start": 1700000040, "count": 2913,
                  "name": "window-000000001200-9f0c3a1b2c3d4e5f.mbw", "bytes": 41234, "xxh3": "..."}]}

``state`` is the state's JSON form (see :mod:`microbatch.aggregate.windows`) without its windows;
each open window is one file in the binary form of :mod:`microbatch.checkpoints.shardcodec` (msgpack
with an XXH3-64 checksum, never pickle), its keys and their inner states (shard 0 of 1). A write
costs what changed: only the windows folded into since the last write get a new file, the others
keep theirs, and a closed window is simply no longer named. Files that no kept manifest names are
removed by :meth:`WindowFiles.collect`, so the folder holds the open windows of a few checkpoints,
whatever the span of event time. Files are written to a temporary name, fsynced and renamed, and
checked against their size and checksum when read back.

Everything here is synchronous file I/O, run in a worker thread on :class:`WindowChanges` that
share nothing with the state being folded.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xxhash

from .._exceptions import CheckpointCorrupt, CheckpointWriteError
from .atomic import folder_identity, fsync_dir, remove_unnamed, write_atomic
from .format import JSON
from .shardcodec import decode_document, encode_document

__all__ = ["MANIFEST_FORMAT", "WindowChanges", "WindowFiles", "WindowFilesLost", "is_manifest"]

MANIFEST_FORMAT = "microbatch.windows-manifest/1"
_TEMP_PREFIX = ".window-"
_FILE_NAME = re.compile(r"window-[0-9]{12,}-[0-9a-f]{16}\.mbw")
_XXH3 = re.compile(r"[0-9a-f]{16}")


class WindowFilesLost(Exception):
    """Files the last manifest names are gone (the folder was deleted under the run): no checkpoint
    is written now, and the next one writes every open window."""


class WindowChanges:
    """What a checkpoint of keyed windows writes, taken from the state between two batches:
    ``head`` (the state's JSON without windows), ``starts`` (the open windows, in order) and
    ``documents`` (``start -> (keys, states)``, JSON forms, of the windows changed since the last
    one)."""

    __slots__ = ("head", "starts", "documents")

    def __init__(
        self, head: dict[str, Any], starts: list[Any], documents: dict[Any, tuple[list[Any], list[Any]]]
    ) -> None:
        self.head = head
        self.starts = starts
        self.documents = documents


class WindowFiles:
    """The window files of one checkpoint store, in ``folder`` (created when first written)."""

    def __init__(self, folder: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(folder)
        self.fsync = fsync
        self._manifest: JSON | None = None
        # documents of a write that failed, written with the next one (a later one of the same
        # window replaces it: each document is a whole window)
        self._pending: dict[Any, tuple[list[Any], list[Any]]] = {}
        self._folder: tuple[int, int] | None = None
        self.lost = False

    def adopt(self, manifest: JSON | None) -> None:
        """Continue from ``manifest`` (the one a resumed state was loaded from), or from nothing."""
        if manifest is not None:
            _check_manifest(manifest, self.path)
        self._manifest = manifest
        self._pending = {}
        self._folder = folder_identity(self.path)
        self.lost = False

    def needs_whole(self) -> bool:
        """Whether the next write must hold every open window: files the last manifest names are
        gone, or the folder was deleted or replaced since (one ``stat``)."""
        if self._manifest is None:
            return False
        return self.lost or folder_identity(self.path) != self._folder

    def write(self, seq: int, changes: WindowChanges) -> JSON:
        """Write the changed windows at batch ``seq``; return the new manifest.

        ``CheckpointWriteError`` when a file cannot be written (the changes are kept for the next
        write, the previous manifest stays valid); :class:`WindowFilesLost` when files the
        previous manifest named are gone.
        """
        documents = {**self._pending, **changes.documents}
        old = {} if self._manifest is None else {e["start"]: e for e in self._manifest["windows"]}
        entries = []
        try:
            for start in changes.starts:
                doc = documents.get(start)
                if doc is not None:
                    entries.append(self._write_window(seq, start, *doc))
                elif start in old:
                    entries.append(old[start])
                else:
                    raise ValueError(
                        f"windows checkpoint at batch {seq}: the open window {start!r} has neither a "
                        f"file nor a change; adopt() the manifest the state was loaded from, or mark "
                        f"every window changed before the first write"
                    )
            if self.fsync and documents:
                fsync_dir(self.path)
        except OSError as exc:
            self._pending = {start: documents[start] for start in changes.starts if start in documents}
            raise CheckpointWriteError(
                f"cannot write window state at batch {seq} in {self.path}: {exc.strerror or exc} "
                f"({type(exc).__name__}); the previous checkpoint is intact and the changes are kept "
                f"for the next one"
            ) from exc
        manifest = {"format": MANIFEST_FORMAT, "seq": seq, "state": changes.head, "windows": entries}
        try:
            present = set(os.listdir(self.path)) if entries else set()
        except FileNotFoundError:
            present = set()
        missing = [e["name"] for e in entries if e["name"] not in present]
        if missing:
            self._pending = {start: documents[start] for start in changes.starts if start in documents}
            self.lost = True
            raise WindowFilesLost(
                f"window state files in {self.path} were deleted while the run wrote them "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); no checkpoint names "
                f"them: the next one writes every open window"
            )
        self._pending = {}
        self._manifest = manifest
        self._folder = folder_identity(self.path)
        self.lost = False
        return manifest

    def _write_window(self, seq: int, start: Any, keys: list[Any], states: list[Any]) -> dict[str, Any]:
        data = encode_document(
            {"kind": "base", "shard": 0, "shards": 1, "count": len(keys), "keys": keys, "states": states}
        )
        name = f"window-{seq:012d}-{secrets.token_hex(8)}.mbw"
        write_atomic(self.path, name, data, prefix=_TEMP_PREFIX, fsync=self.fsync)
        return {"start": start, "count": len(keys), "name": name, "bytes": len(data),
                "xxh3": xxhash.xxh3_64_hexdigest(data)}

    def read(self, manifest: JSON) -> JSON:
        """The state's JSON form (as ``Windows.dump`` gives it) from ``manifest`` and its files.

        ``CheckpointCorrupt`` naming the file when one is missing, of another size or checksum, or
        not a window file.
        """
        _check_manifest(manifest, self.path)
        windows = []
        for entry in manifest["windows"]:
            file = self.path / entry["name"]
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise CheckpointCorrupt(f"window state file {file} cannot be read: {exc}") from exc
            digest = xxhash.xxh3_64_hexdigest(data)
            if len(data) != entry["bytes"] or digest != entry["xxh3"]:
                raise CheckpointCorrupt(
                    f"window state file {file} is damaged: {len(data)} bytes, checksum {digest}; the "
                    f"manifest expects {entry['bytes']} bytes, checksum {entry['xxh3']}"
                )
            doc = decode_document(data, f"window state file {file}")
            if doc["count"] != entry["count"] or len(doc["keys"]) != entry["count"]:
                raise CheckpointCorrupt(
                    f"window state file {file} holds {len(doc['keys'])} keys, the manifest says "
                    f"{entry['count']}"
                )
            windows.append([entry["start"], {"keys": doc["keys"], "states": doc["states"]}])
        return {**manifest["state"], "windows": windows}

    def collect(self, manifests: Iterable[JSON | None]) -> list[str]:
        """Remove the window files (and leftover temporary files) that none of ``manifests`` (nor
        the last one written) names; return the names removed."""
        keep: set[str] = set()
        for manifest in [*manifests, self._manifest]:
            if manifest is not None:
                keep.update(entry["name"] for entry in manifest["windows"])
        return remove_unnamed(self.path, keep, prefix="window-", suffixes=(".mbw",), temp_prefix=_TEMP_PREFIX)


def is_manifest(data: object) -> bool:
    """Whether ``data`` is (meant as) a manifest of window files."""
    return isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT


def _check_manifest(manifest: JSON, path: Path) -> None:
    """``CheckpointCorrupt`` naming the field when ``manifest`` is not one :meth:`WindowFiles.write`
    made (every file a plain window file name: a crafted manifest reads nothing outside the folder)."""
    if not (is_manifest(manifest) and type(manifest.get("seq")) is int
            and isinstance(manifest.get("state"), dict) and isinstance(manifest.get("windows"), list)):
        raise CheckpointCorrupt(f"not a manifest of window state files in {path}: {manifest!r:.200}")
    for i, entry in enumerate(manifest["windows"]):
        where = f"windows[{i}]"
        problem = None
        if not isinstance(entry, dict):
            problem = "not an object"
        elif isinstance(entry.get("start"), bool) or not isinstance(entry.get("start"), (int, float)):
            problem = "has no start (a number)"
        elif not isinstance(entry.get("name"), str) or not _FILE_NAME.fullmatch(entry["name"]):
            problem = "has no plain window file name"
        elif any(type(entry.get(f)) is not int or entry[f] < 0 for f in ("bytes", "count")):
            problem = "has no bytes and count (ints >= 0)"
        elif not isinstance(entry.get("xxh3"), str) or not _XXH3.fullmatch(entry["xxh3"]):
            problem = "has no XXH3-64 checksum in hex"
        if problem is not None:
            raise CheckpointCorrupt(f"window state manifest for {path}: {where} {problem}: {entry!r:.100}")
