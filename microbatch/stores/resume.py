"""What a pipeline does with a store before it reads: every resume check in one call, in order.

:func:`restore` loads the newest checkpoint the pipeline can resume from (falling back past invalid
ones), checks the fingerprint, loads the aggregator's state and, for a file, finds out what became
of the file. It blocks (file I/O); call it through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._core.checkpoint import JSON, Checkpoint, InvalidCheckpoint, PositionKind, check_position, checked
from .._core.fingerprint import check_fingerprint
from . import CheckpointStore, load_valid

__all__ = ["Restored", "restore"]

logger = logging.getLogger("microbatch.checkpoint")


@dataclass(frozen=True)
class Restored:
    """A checkpoint to resume from: the ``checkpoint``, the aggregator ``state`` its ``load`` returned,
    the ``position`` checked for the source's kind, the fingerprint ``changes`` accepted (empty
    unless ``accept_changes``), and for a file source ``file`` (a ``sources.identity.FileState``:
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
    from ..sources.identity import FilePosition, classify  # file sources only

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

    checkpoint = load_valid(store, validate)
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
