"""A run's checkpoints: open and lock the store, restore at the start, save when due and at the end.

The store is opened and locked (one writer at a time), the newest valid checkpoint is checked
against the pipeline's fingerprint and handed back to the run; saves write the dead-letter file's
durable length together with the state, so a resumed run cuts it back to what was folded.

:func:`restore` runs every resume check in one call, in order: the newest checkpoint the pipeline
can resume from (falling back past invalid ones), the fingerprint, the aggregator's state and, for a
file, what became of the file. It blocks (file I/O); :class:`Checkpoints` calls it in a worker
thread.

Keyed state (``ByKey``, ``TopK``) in a folder or SQLite store is not written whole each time: each
save writes the shards' changes since the last one into shard files beside the store (``keyed/``
in a folder, ``NAME.keyed/`` beside a SQLite file), compacted into new bases as they grow, and
the checkpoint's state is the manifest naming them, so a checkpoint costs what changed. Keyed
time windows are kept the same way, one file per open window (``windows/``, ``NAME.windows/``),
rewritten only when the window changed (:mod:`microbatch.checkpoints.windowfiles`).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import anyio

from .._core.fingerprint import check_fingerprint
from .._exceptions import InvalidCheckpoint
from .deadletters import DeadLetterFile
from .directory import DirectoryStore
from .format import JSON, Checkpoint, PositionKind, check_position, checked
from .identity import FilePosition, classify, file_position
from .shards import MANIFEST_FORMAT, ShardFiles, ShardFilesLost
from .sqlite import SqliteStore
from .store import CheckpointStore
from .targets import is_sqlite_target, open_store
from .windowfiles import WindowChanges, WindowFiles, WindowFilesLost, is_manifest

__all__ = ["Checkpoints", "DeferredShards", "Restored", "ShardBarrier", "dead_letter_path", "restore"]

log = logging.getLogger("microbatch")
logger = logging.getLogger("microbatch.checkpoint")


class StateCodec(Protocol):
    """What a run's checkpoints need of its aggregator: its state as JSON data and back."""

    def dump(self, state: Any) -> JSON: ...

    def load(self, data: JSON) -> Any: ...

    def describe(self) -> str: ...


@runtime_checkable
class ShardedCodec(StateCodec, Protocol):
    """A keyed aggregator (``ByKey``, ``TopK``): its state is written as shard files, by changes."""

    shards: int

    def dump_changes(self, state: Any) -> list[JSON]: ...

    def load_documents(self, documents: Iterable[JSON]) -> Any: ...

    def mark_all_changed(self, state: Any) -> None: ...

Target = str | os.PathLike[str] | CheckpointStore


def dead_letter_path(dead_letter: str | os.PathLike[str] | None, target: Target | None) -> str:
    """Where dead letters go: ``dead_letter`` when given, else a file that belongs to the checkpoint.

    A resumed run cuts the dead-letter file back to the length its checkpoint recorded, so two
    pipelines must never share one by default: a folder store keeps ``DIR/dead-letters.jsonl``, a
    SQLite store ``NAME.dead-letters.jsonl`` beside its file (``state.sqlite`` ->
    ``state.sqlite.dead-letters.jsonl``), a store object of another kind
    ``dead-letters-<hash of its location>.jsonl`` in the current directory. Without a checkpoint
    nothing is ever cut back: ``dead-letters.jsonl`` in the current directory, appended to.
    """
    if dead_letter is not None:
        return os.fspath(dead_letter)
    if target is None:
        return "dead-letters.jsonl"
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        if is_sqlite_target(path):
            return path + ".dead-letters.jsonl"
        return os.path.join(path, "dead-letters.jsonl")
    if isinstance(target, DirectoryStore):
        return os.fspath(target.path / "dead-letters.jsonl")
    if isinstance(target, SqliteStore):
        return os.fspath(target.path) + ".dead-letters.jsonl"
    digest = hashlib.sha256(target.location.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"dead-letters-{digest}.jsonl"


@dataclass(frozen=True)
class Restored:
    """A checkpoint to resume from: the ``checkpoint``, the aggregator ``state`` its ``load`` returned,
    the ``position`` checked for the source's kind, the fingerprint ``changes`` accepted (empty
    unless ``accept_changes``), and for a file source ``file`` (a ``identity.FileState``:
    ``grown``, ``same``, ``rotated`` or, when followed, ``recreated``; ``None`` when the checkpoint
    recorded no identity)."""

    checkpoint: Checkpoint
    state: Any
    position: JSON
    changes: list[str]
    file: Any = None


def restore(
    store: CheckpointStore,
    *,
    fingerprint: Mapping[str, str],
    kind: PositionKind,
    load_state: Callable[[JSON], Any],
    path: str | os.PathLike[str] | None = None,
    follow: bool = False,
    accept_changes: bool = False,
) -> Restored | None:
    """Return what to resume from, or ``None`` when the store holds no checkpoint.

    1. The newest checkpoint whose position suits ``kind`` (``check_position``), whose identity
       (when ``path`` is given) is well formed, and whose state ``load_state`` accepts; the others
       are skipped with a warning naming the field, falling back to the previous one.
    2. ``CheckpointMismatch`` when the fingerprint differs from ``fingerprint``, naming each change,
       unless ``accept_changes`` (then the changes are logged and returned).
    3. For a file (``path``) whose checkpoint holds an identity: ``CheckpointMismatch`` saying what
       differs when the file was rewritten, truncated or replaced and its data is nowhere else, or
       is missing, or its bytes before the offset changed (the first range that differs is named);
       otherwise the ``FileState`` in ``Restored.file``. A followed file (``follow``) replaced
       by a new one is ``recreated``: read from its start. A ``finished`` checkpoint
       whose file has grown is logged: the rerun reads only what was appended.
    """
    loaded: list[Any] = []

    found: list[list[str]] = []

    def validate(checkpoint: Checkpoint) -> None:
        # Another pipeline's checkpoint is a mismatch (which stops the resume), not a bad state.
        found[:] = [
            check_fingerprint(
                checkpoint.fingerprint, fingerprint, location=store.location, accept_changes=accept_changes
            )
        ]
        position = check_position(checkpoint, kind)
        if path is not None and checkpoint.identity is not None:
            identity = FilePosition.from_json(checkpoint.identity)
            if identity.offset != position:
                raise InvalidCheckpoint(
                    "identity.offset", f"is {identity.offset}, not the position {position} it belongs to"
                )
        loaded[:] = [checked("state", load_state, checkpoint.state)]

    checkpoint = store.load(validate)
    if checkpoint is None:
        return None
    changes = found[0]
    position = check_position(checkpoint, kind)
    file_state = None
    if path is not None and checkpoint.identity is not None:
        file_state = classify(path, FilePosition.from_json(checkpoint.identity), follow=follow)
        if file_state.kind == "missing" and checkpoint.finished:
            # Nothing is left to read: the finished run's value stands without its input.
            logger.info("%s is gone; the finished run of %s still has its value", path, store.location)
        elif file_state.kind in ("changed", "missing"):
            raise file_state.error()
        if checkpoint.finished and file_state.kind == "grown":
            logger.info(
                "%s has %d new bytes since the finished run of %s: reading only those",
                file_state.path, max(0, file_state.size - file_state.offset), store.location,
            )
    return Restored(checkpoint, loaded[0], position, changes, file_state)


#: Manifests whose shard files are kept: those of the checkpoints a store keeps to fall back on.
_KEEP_MANIFESTS = 3


class _KeyedChanges:
    """A keyed state's changes since the last save, to be written as shard files."""

    __slots__ = ("agg", "documents", "shards", "state")

    def __init__(self, agg: ShardedCodec, state: Any) -> None:
        self.agg, self.state, self.shards = agg, state, agg.shards
        self.documents = agg.dump_changes(state)

    def take_whole(self) -> None:
        """Every shard whole, from the live state (only right when nothing was folded since)."""
        self.agg.mark_all_changed(self.state)
        self.documents = self.agg.dump_changes(self.state)


@runtime_checkable
class ShardBarrier(Protocol):
    """Keyed state held elsewhere (shard owners), asked for a checkpoint when ``dump`` is taken.

    ``write_shards(seq)`` (called in the checkpoint thread) waits until every holder wrote its
    shard files as of batch ``seq`` and returns the manifest naming them; ``CheckpointWriteError``
    when one could not, the previous checkpoint staying valid.
    """

    def write_shards(self, seq: int) -> JSON: ...


class DeferredShards:
    """A keyed checkpoint's manifest, not loaded: the shard owners of the run load their shards.

    ``load()`` loads it whole in this process instead (when the run uses no owners after all).
    """

    __slots__ = ("manifest", "folder", "load")

    def __init__(self, manifest: JSON, folder: str, load: Callable[[], Any]) -> None:
        self.manifest = manifest
        self.folder = folder
        self.load = load


class Checkpoints:
    """The checkpoint store of one run (None: the run keeps no checkpoints).

    ``kind`` is the kind of position the source has (checked in every checkpoint resumed from);
    ``path`` the file whose identity each checkpoint records with the offset (None: not a file).
    """

    def __init__(
        self,
        target: Target | None,
        fingerprint: dict[str, str],
        dead: DeadLetterFile,
        *,
        kind: PositionKind,
        path: str | None,
        follow: bool = False,
    ) -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.dead = dead
        self.kind: PositionKind = kind
        self.path = path
        self.follow = follow
        self.store: CheckpointStore | None = None
        self.saved = 0
        #: Which file an offset belongs to, for a source that can tell (a followed, rotating file).
        self.identify: Callable[[int], Any] | None = None
        self._files: ShardFiles | None = None
        self._manifests: collections.deque[Any] = collections.deque(maxlen=_KEEP_MANIFESTS)
        self._windows: WindowFiles | None = None
        self._window_manifests: collections.deque[Any] = collections.deque(maxlen=_KEEP_MANIFESTS)
        #: Shard owners will hold keyed state: a keyed checkpoint resumed from is not loaded here
        #: but given as ``DeferredShards``, and saves ask the aggregator's ``barrier``.
        self.defer_keyed = False

    def _shard_files(self) -> ShardFiles | None:
        """Where keyed state's shard files go: beside a folder or SQLite store; None for others."""
        if self._files is None and isinstance(self.target, (str, os.PathLike)):
            target = os.fspath(self.target)
            folder = target + ".keyed" if is_sqlite_target(target) else os.path.join(target, "keyed")
            self._files = ShardFiles(folder)
        return self._files

    def _window_files(self) -> WindowFiles | None:
        """Where keyed time windows' files go: beside a folder or SQLite store; None for others."""
        if self._windows is None and isinstance(self.target, (str, os.PathLike)):
            target = os.fspath(self.target)
            folder = target + ".windows" if is_sqlite_target(target) else os.path.join(target, "windows")
            self._windows = WindowFiles(folder)
        return self._windows

    def dump(self, agg: StateCodec, state: Any) -> Any:
        """What a checkpoint of ``state`` holds, taken without awaiting (folding may go on after)."""
        window_changes = getattr(agg, "window_changes", None)
        windows = self._window_files()
        if window_changes is not None and windows is not None:
            if windows.needs_whole():  # the folder was deleted under the run: every window again
                agg.mark_windows_changed(state)  # type: ignore[attr-defined]
            changes = window_changes(state)
            if changes is not None:
                return changes
        files = self._shard_files()
        barrier = getattr(agg, "barrier", None)
        if barrier is not None and files is not None:
            return barrier(state, str(files.path))
        if isinstance(agg, ShardedCodec) and files is not None:
            if files.needs_base():  # the shard folder was deleted under the run: start it afresh
                agg.mark_all_changed(state)
            return _KeyedChanges(agg, state)
        return agg.dump(state)

    def loader(self, agg: StateCodec) -> Callable[[Any], Any]:
        """How a resumed run turns a checkpoint's state back into the aggregator's state."""

        def load(data: Any) -> Any:
            windows = self._window_files()
            if is_manifest(data) and windows is not None:
                if not hasattr(agg, "window_changes"):
                    raise ValueError(f"window state files cannot be loaded by {agg.describe()}")
                state = agg.load(windows.read(data))
                windows.adopt(data)
                self._keep(data, self._window_manifests)
                return state
            files = self._shard_files()
            if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and files is not None:
                if not isinstance(agg, ShardedCodec):
                    raise ValueError(f"keyed shard files cannot be loaded by {agg.describe()}")

                def load_here() -> Any:
                    state = agg.load_documents(files.read(data))
                    files.adopt(data)
                    return state

                if self.defer_keyed:
                    files.verify(data)  # sizes and checksums now (a damaged one: the previous checkpoint)
                    self._keep(data)
                    return DeferredShards(data, str(files.path), load_here)
                state = load_here()
                self._keep(data)
                return state
            state = agg.load(data)
            if isinstance(agg, ShardedCodec):
                agg.mark_all_changed(state)  # the first save writes every shard whole
            if hasattr(agg, "mark_windows_changed"):
                agg.mark_windows_changed(state)  # the first save writes every open window
            return state

        load.__qualname__ = f"{agg.describe()}.load"  # how a refusal names it
        return load

    async def open(
        self, *, fresh: bool, accept_changes: bool, agg: StateCodec
    ) -> Restored | None:
        """Open and lock the store; return what to resume from (None: start afresh).

        Checkpoints with a field of the wrong type or range are skipped (the previous one is used);
        a changed pipeline or input is refused unless ``accept_changes`` (see :func:`restore`).
        """
        if self.target is None:
            return None
        # Opening and locking a store is file I/O (the lock also removes stale temporary files).
        store = self.store = await anyio.to_thread.run_sync(open_store, self.target)
        await anyio.to_thread.run_sync(store.lock)  # one writer at a time
        # A run without a checkpoint appends to the dead-letter file as it finds it; checkpoints
        # record the file's absolute length, so a resumed run cuts back only what it wrote itself.
        if fresh:
            await anyio.to_thread.run_sync(store.clear)
            files = self._shard_files()
            if files is not None and files.path.is_dir():
                await anyio.to_thread.run_sync(files.collect, [])
            windows = self._window_files()
            if windows is not None and windows.path.is_dir():
                await anyio.to_thread.run_sync(windows.collect, [])
            return None
        restored = await anyio.to_thread.run_sync(
            functools.partial(
                restore,
                store,
                fingerprint=self.fingerprint,
                kind=self.kind,
                load_state=self.loader(agg),
                path=self.path,
                follow=self.follow,
                accept_changes=accept_changes,
            )
        )
        if restored is None:
            return None
        cp = restored.checkpoint
        self.dead.truncate_to(cp.dead_letters)
        log.info(
            "resuming from %s: %d batches, %d records folded%s",
            store.location,
            cp.batches,
            cp.records,
            " (finished)" if cp.finished else "",
        )
        return restored

    async def save(self, *, batches: int, records: int, position: Any, state: Any, finished: bool) -> None:
        """Write one checkpoint (off the event loop); nothing without a store."""
        store = self.store
        if store is None:
            return
        files, windows = self._files, self._windows

        def write() -> bool:
            data = state
            if isinstance(state, WindowChanges):
                assert windows is not None
                try:
                    data = windows.write(batches, state)
                except WindowFilesLost as exc:
                    log.warning("checkpoint at batch %d not written: %s", batches, exc)
                    return False
            elif isinstance(state, ShardBarrier):
                data = state.write_shards(batches)
            elif isinstance(state, _KeyedChanges):
                assert files is not None
                try:
                    data = files.write(batches, state.documents, shards=state.shards)
                except ShardFilesLost as exc:
                    log.warning("checkpoint at batch %d not written: %s", batches, exc)
                    return False
            cp = Checkpoint(
                batches=batches,
                records=records,
                position=position,
                state=data,
                dead_letters=self.dead.length,
                fingerprint=self.fingerprint,
                finished=finished,
                identity=self._identity(position),
            )
            self.dead.sync()
            store.save(cp)
            if files is not None and isinstance(state, (_KeyedChanges, ShardBarrier)):
                self._keep(data)
                files.collect(self._manifests)  # shard files no kept checkpoint names
            if windows is not None and isinstance(state, WindowChanges):
                self._keep(data, self._window_manifests)
                windows.collect(self._window_manifests)  # window files no kept checkpoint names
            return True

        # A save once begun is finished, also when the run is cancelled meanwhile: the changes it
        # took from a keyed state are in no other save, and the final checkpoint follows it.
        with anyio.CancelScope(shield=True):
            written = await anyio.to_thread.run_sync(write)
            if not written and finished and isinstance(state, _KeyedChanges):
                # Nothing folds after the last save: the live state is the one at ``batches``.
                state.take_whole()
                written = await anyio.to_thread.run_sync(write)
        if not written:
            return
        self.saved += 1
        log.debug("checkpoint %d written to %s at batch %d", self.saved, store.location, batches)

    def _keep(self, manifest: Any, kept: collections.deque[Any] | None = None) -> None:
        """Remember ``manifest`` among those of the checkpoints the store keeps (in ``kept``, the
        keyed manifests by default). A checkpoint with the number of the last one replaces it in
        the store (the final save after a regular one), so its manifest replaces the last one here
        too, and the older ones' files stay."""
        kept = self._manifests if kept is None else kept
        if kept and kept[-1]["seq"] == manifest["seq"]:
            kept.pop()
        kept.append(manifest)

    def _identity(self, position: Any) -> Any:
        """Which file the offset belongs to, so a resume can tell a grown file from another one."""
        if self.path is None or not isinstance(position, int):
            return None
        try:
            if self.identify is not None:
                found = self.identify(position)
                return None if found is None else found.to_json()
            return file_position(self.path, position).to_json()
        except (OSError, ValueError) as exc:
            # A followed file rotated under the run: the path names a newer file now.
            log.warning("no identity recorded for %s at offset %d: %s", self.path, position, exc)
            return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
