"""Shard files of keyed state: per-shard base and delta files, named by a manifest at one batch number.

A keyed aggregator's checkpoint is a small JSON *manifest* that goes into the pipeline's atomic
checkpoint in place of the whole state::

    {"format": "microbatch.keyed-manifest/1", "seq": 1200, "shards": 16,
     "entries": [{"shard": 0, "count": 51234,
                  "base": {"name": "shard-0000-000000001000-base.json", "bytes": 812345, "xxh3": "9f0c..."},
                  "deltas": [{"name": "shard-0000-000000001200-delta.json", ...}]}, ...]}

Each file holds one shard document (see :mod:`microbatch.aggregate.bykey`): JSON in a ``.json``
file, or the binary form of :mod:`microbatch.checkpoints.shardcodec` in a ``.mbk`` file (what shard
owners write, ``ShardFiles(binary=True)``). Reading a shard's
base and then its deltas in order gives the shard at batch ``seq``. Files are written to a
temporary name, fsynced and renamed, never overwritten in place while a manifest names them, and
checked against their size and XXH3-64 checksum when read back.

A write costs what changed: a shard that changed gets a delta file of its changed keys, until its
deltas together outgrow ``compact_ratio`` times its base; then the base and deltas are merged (from
the files, not from the live state) into a new base. Files that no kept manifest names are removed
by :meth:`ShardFiles.collect`.

Everything here is synchronous file I/O: the pipeline runs it in a worker thread, off its event
loop, on documents that share nothing with the state being folded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import xxhash

from .._core.keys import key_bytes, key_from_json, key_to_json
from .._core.ring import ring
from .._exceptions import CheckpointCorrupt, CheckpointWriteError
from .atomic import folder_identity, fsync_dir, remove_unnamed, write_atomic
from .format import JSON
from .shardcodec import decode_document, encode_document

__all__ = ["MANIFEST_FORMAT", "ShardFiles", "ShardFilesLost", "merge_documents"]

MANIFEST_FORMAT = "microbatch.keyed-manifest/1"
_TEMP_PREFIX = ".shard-"


def merge_documents(documents: list[JSON]) -> JSON:
    """One document equivalent to ``documents`` (all of one shard, in order): a later state of a
    key replaces an earlier one; the result is a base when any input is a base, else a delta."""
    if len(documents) == 1:
        return documents[0]
    start = 0
    for i, doc in enumerate(documents):
        if doc["kind"] == "base":
            start = i
    # JSON forms of keys: a str and an int are never equal, so they index the merge as they are;
    # only arrays (tuples) need turning into something hashable
    merged: dict[Any, Any] = {}
    for doc in documents[start:]:
        keys = doc["keys"]
        if any(type(key) is list for key in keys):
            keys = [key_from_json(key) if type(key) is list else key for key in keys]
        merged.update(zip(keys, doc["states"], strict=True))
    return {
        **documents[-1],
        "kind": documents[start]["kind"],
        "keys": [key_to_json(key) if type(key) is tuple else key for key in merged],
        "states": list(merged.values()),
    }


class ShardFilesLost(CheckpointWriteError):
    """Files a manifest would name are gone: the checkpoint is not written (see ``ShardFiles.lost``)."""


class ShardFiles:
    """Writes keyed state's shard documents into ``directory`` and names them in manifests.

    ``compact_ratio`` (default 1.0, > 0): a shard's deltas are merged into a new base once their
    bytes together pass this multiple of its base's bytes, so reading a shard back costs at most
    about ``1 + compact_ratio`` times its base. ``fsync`` (default True) makes each write durable
    before the manifest is returned; tests may turn it off.

    Not thread-safe: one thread writes at a time (the pipeline's checkpoint thread).
    """

    def __init__(self, directory: str | os.PathLike[str], *, compact_ratio: float = 1.0,
                 fsync: bool = True, binary: bool = False) -> None:
        if isinstance(compact_ratio, bool) or not isinstance(compact_ratio, (int, float)) \
                or not compact_ratio > 0:
            raise ValueError(f"ShardFiles(compact_ratio): must be a number > 0, got {compact_ratio!r}")
        self.path = Path(directory)
        self.compact_ratio = float(compact_ratio)
        self.fsync = fsync
        #: Write binary shard files (``.mbk``, :mod:`~microbatch.checkpoints.shardcodec`) rather
        #: than JSON. Either kind is read, whatever this says.
        self.binary = binary
        self._suffix = ".mbk" if binary else ".json"
        self._manifest: JSON | None = None
        self._pending: list[JSON] = []  # documents of a write that failed, merged into the next one
        self._folder: tuple[int, int] | None = None  # (device, inode) of the folder last written
        #: Whether files the last manifest names are gone (the folder was deleted, or files in it):
        #: the next write must hold a base of every shard (see :meth:`needs_base`).
        self.lost = False

    def adopt(self, manifest: JSON | None) -> None:
        """Continue from ``manifest`` (the one a resumed state was loaded from), or from nothing."""
        if manifest is not None:
            _check_manifest(manifest, self.path)
        self._manifest = manifest
        self._pending = []
        self._folder = folder_identity(self.path)
        self.lost = False

    def needs_base(self) -> bool:
        """Whether the next write must give every shard whole: the files the last manifest names are
        not all there (``lost``), or the folder was deleted or replaced since (one ``stat``)."""
        if self._manifest is None:
            return False
        return self.lost or folder_identity(self.path) != self._folder

    def write(self, seq: int, documents: list[JSON], *, shards: int) -> JSON:
        """Write the documents of ``dump_changes`` at batch ``seq`` of a state of ``shards`` shards.

        Returns the new manifest (the previous one with the changed shards' entries replaced).

        ``CheckpointWriteError`` when a file cannot be written; the documents are then kept and
        written with the next call's, so no change is lost, and the previous manifest stays valid.
        """
        documents = [*self._pending, *documents]
        by_shard: dict[int, list[JSON]] = {}
        for doc in documents:
            by_shard.setdefault(doc["shard"], []).append(doc)
        if any(doc["shards"] != shards for doc in documents):
            raise ValueError(f"keyed checkpoint at batch {seq}: a document is not of {shards} shards")
        old = self._manifest
        whole = len(by_shard) == shards and all(doc["kind"] == "base" for doc in documents)
        if old is not None and old["shards"] == shards and not whole:
            entries = [dict(entry) for entry in old["entries"]]
        else:
            if old is not None and not whole:
                raise ValueError(
                    f"keyed checkpoint at batch {seq}: going from {old['shards']} to {shards} shards "
                    f"needs a base document of every shard"
                )
            entries = [{"shard": s, "count": 0, "base": None, "deltas": []} for s in range(shards)]
        try:
            for shard, docs in sorted(by_shard.items()):
                entries[shard] = self._write_shard(seq, entries[shard], merge_documents(docs))
            if self.fsync and by_shard:
                fsync_dir(self.path)
        except OSError as exc:
            self._pending = documents
            raise CheckpointWriteError(
                f"cannot write keyed state at batch {seq} in {self.path}: {exc.strerror or exc} "
                f"({type(exc).__name__}); the previous checkpoint is intact and the changes are kept "
                f"for the next one"
            ) from exc
        manifest = {"format": MANIFEST_FORMAT, "seq": seq, "shards": shards, "entries": entries}
        missing = self.missing(manifest)
        if missing:
            # Files written before are gone (the folder deleted under the run): this manifest would
            # name them. Keep the changes; the caller writes every shard whole next time.
            self._pending = documents
            self.lost = True
            raise ShardFilesLost(
                f"keyed state files in {self.path} were deleted while the run wrote them "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); no checkpoint names "
                f"them: the next one writes every shard whole"
            )
        self._pending = []
        self._manifest = manifest
        self._folder = folder_identity(self.path)
        self.lost = False
        return manifest

    def missing(self, manifest: JSON) -> list[str]:
        """The names ``manifest`` gives that are not files in the folder (one listing)."""
        try:
            present = set(os.listdir(self.path))
        except FileNotFoundError:
            present = set()
        return [name for name in _names(manifest) if name not in present]

    def _write_shard(self, seq: int, entry: dict[str, Any], doc: JSON) -> dict[str, Any]:
        shard = doc["shard"]
        base = entry["base"]
        if doc["kind"] == "delta" and base is not None:
            data = self._encode(doc)
            delta_bytes = sum(d["bytes"] for d in entry["deltas"]) + len(data)
            if delta_bytes <= self.compact_ratio * base["bytes"]:
                meta = self._write_file(f"shard-{shard:04d}-{seq:012d}-delta{self._suffix}", data)
                return {**entry, "count": doc["count"], "deltas": [*entry["deltas"], meta]}
            # the deltas outgrew the base: merge the shard's files and this change into a new base
            doc = merge_documents([*self._read_entry(entry), doc])
        if doc["kind"] == "delta" and len(doc["keys"]) != doc["count"]:
            raise ValueError(
                f"keyed checkpoint at batch {seq}: shard {shard} has no base file yet, and this delta "
                f"names {len(doc['keys'])} of its {doc['count']} keys; adopt() the manifest the state "
                f"was loaded from, or mark_all_changed() the state before its first write"
            )
        data = self._encode({**doc, "kind": "base"})
        meta = self._write_file(f"shard-{shard:04d}-{seq:012d}-base{self._suffix}", data)
        return {"shard": shard, "count": doc["count"], "base": meta, "deltas": []}

    def _encode(self, doc: JSON) -> bytes:
        return encode_document(doc) if self.binary else _encode(doc)

    def _write_file(self, name: str, data: bytes) -> dict[str, Any]:
        write_atomic(self.path, name, data, prefix=_TEMP_PREFIX, fsync=self.fsync)
        return {"name": name, "bytes": len(data), "xxh3": xxhash.xxh3_64_hexdigest(data)}

    # --- reading -------------------------------------------------------------------------------

    def read(self, manifest: JSON) -> Iterator[JSON]:
        """Every document ``manifest`` names, each shard's base then its deltas.

        ``CheckpointCorrupt`` naming the file when one is missing, of another size or checksum, or
        not a shard document.
        """
        _check_manifest(manifest, self.path)
        for entry in manifest["entries"]:
            yield from self._read_entry(entry)

    def _read_entry(self, entry: dict[str, Any]) -> list[JSON]:
        metas = ([entry["base"]] if entry["base"] is not None else []) + list(entry["deltas"])
        return [self._read_file(meta) for meta in metas]

    def verify(self, manifest: JSON) -> None:
        """Check every file ``manifest`` names against its size and checksum, without parsing it
        (the shard owners that load the files parse them); ``CheckpointCorrupt`` naming the file."""
        _check_manifest(manifest, self.path)
        for entry in manifest["entries"]:
            for meta in ([entry["base"]] if entry["base"] else []) + entry["deltas"]:
                self._file_bytes(meta)

    def _file_bytes(self, meta: dict[str, Any]) -> bytes:
        file = self.path / meta["name"]
        try:
            data: bytes = file.read_bytes()
        except OSError as exc:
            raise CheckpointCorrupt(f"keyed state file {file} cannot be read: {exc}") from exc
        if len(data) != meta["bytes"] or xxhash.xxh3_64_hexdigest(data) != meta["xxh3"]:
            raise CheckpointCorrupt(
                f"keyed state file {file} is damaged: {len(data)} bytes, checksum "
                f"{xxhash.xxh3_64_hexdigest(data)}; the manifest expects {meta['bytes']} bytes, "
                f"checksum {meta['xxh3']}"
            )
        return data

    def _read_file(self, meta: dict[str, Any]) -> JSON:
        data = self._file_bytes(meta)
        file = self.path / meta["name"]
        if file.suffix == ".mbk":
            return decode_document(data, f"keyed state file {file}")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise CheckpointCorrupt(f"keyed state file {file} is not JSON: {exc}") from exc

    def counts(self, manifest: JSON) -> list[int]:
        """The number of keys of each shard, from the manifest alone."""
        _check_manifest(manifest, self.path)
        return [entry["count"] for entry in manifest["entries"]]

    def lookup(self, manifest: JSON, key: object) -> tuple[bool, JSON]:
        """``(found, dumped inner state)`` of ``key``, reading only the files of the key's shard."""
        _check_manifest(manifest, self.path)
        shard = ring(manifest["shards"]).shard_of(key)
        wanted = key_bytes(key)
        found, state = False, None
        for doc in self._read_entry(manifest["entries"][shard]):
            for key_data, inner in zip(doc["keys"], doc["states"], strict=True):
                if key_bytes(key_from_json(key_data)) == wanted:
                    found, state = True, inner
        return found, state

    def collect(self, manifests: Iterable[JSON | None]) -> list[str]:
        """Remove the shard files (and leftover temporary files) that none of ``manifests`` names.

        Call it after a checkpoint was committed, with every manifest a resume may still need (the
        newest and the previous good one). Returns the names removed.
        """
        keep: set[str] = set()
        for manifest in [*manifests, self._manifest]:
            if manifest is not None:
                keep.update(_names(manifest))
        return remove_unnamed(
            self.path, keep, prefix="shard-", suffixes=(".json", ".mbk"), temp_prefix=_TEMP_PREFIX
        )


def _encode(doc: JSON) -> bytes:
    # ASCII only: lone surrogates in keys (from surrogateescape decoding) become \\udcXX escapes
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _names(manifest: JSON) -> list[str]:
    """Every file name a (checked) manifest gives, base then deltas, shard by shard."""
    names: list[str] = []
    for entry in manifest.get("entries", []):
        metas = ([entry["base"]] if entry["base"] else []) + entry["deltas"]
        names.extend(meta["name"] for meta in metas)
    return names


#: A shard file's name: a plain name inside the folder, never a path.
_FILE_NAME = re.compile(r"shard-[0-9]{4,}-[0-9]{12,}-(?:base|delta)\.(?:json|mbk)")
_XXH3 = re.compile(r"[0-9a-f]{16}")


def _check_manifest(manifest: JSON, path: Path) -> None:
    """``CheckpointCorrupt`` naming the entry when ``manifest`` is not one :meth:`ShardFiles.write`
    made: every field of the expected type and range, every file a plain shard file name, so that
    a crafted manifest cannot make a resume read a file outside the folder."""
    if not (
        isinstance(manifest, dict)
        and manifest.get("format") == MANIFEST_FORMAT
        and type(manifest.get("shards")) is int
        and manifest["shards"] >= 1
        and type(manifest.get("seq")) is int
        and isinstance(manifest.get("entries"), list)
        and len(manifest["entries"]) == manifest["shards"]
    ):
        raise CheckpointCorrupt(f"not a manifest of keyed state files in {path}: {manifest!r:.200}")
    for i, entry in enumerate(manifest["entries"]):
        where = f"entries[{i}]"
        if not isinstance(entry, dict) or entry.get("shard") != i or type(entry.get("shard")) is not int:
            _bad_entry(path, where, entry, f"not the entry of shard {i}")
        count = entry.get("count")
        if type(count) is not int or count < 0:
            _bad_entry(path, f"{where}.count", count, "not an int >= 0")
        deltas = entry.get("deltas")
        if not isinstance(deltas, list) or (entry.get("base") is None and deltas):
            _bad_entry(path, f"{where}.deltas", deltas, "not a list of files after a base")
        metas = [("base", entry.get("base"))] if entry.get("base") is not None else []
        metas += [(f"deltas[{j}]", meta) for j, meta in enumerate(deltas)]
        for name, meta in metas:
            _check_file_entry(path, f"{where}.{name}", meta)


def _check_file_entry(path: Path, where: str, meta: object) -> None:
    if not isinstance(meta, dict):
        _bad_entry(path, where, meta, "not a file entry (an object)")
    name = meta.get("name")
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        _bad_entry(path, f"{where}.name", name, "not a plain shard file name in that folder")
    size = meta.get("bytes")
    if type(size) is not int or size < 0:
        _bad_entry(path, f"{where}.bytes", size, "not an int >= 0")
    digest = meta.get("xxh3")
    if not isinstance(digest, str) or not _XXH3.fullmatch(digest):
        _bad_entry(path, f"{where}.xxh3", digest, "not an XXH3-64 checksum in hex")


def _bad_entry(path: Path, where: str, value: object, why: str) -> NoReturn:
    raise CheckpointCorrupt(f"keyed state manifest for {path}: {where} is {value!r:.100}, {why}")
