"""What a checkpoint store is: the protocol, and the loading rules every store shares.

The built-in stores (:mod:`.directory`, :mod:`.sqlite`) are synchronous and thread-safe enough to
be called through ``anyio.to_thread.run_sync`` one call at a time. They keep the newest ``keep``
checkpoints (default 3), so that a corrupt newest checkpoint falls back to the previous one, which
``load`` reports (``logging`` warning and the ``skipped`` attribute) rather than silently resetting.

Checkpoints are ordered by ``batches``: the newest is the one with the most batches folded. Saving a
checkpoint replaces one with the same number and removes those numbered above it (they were skipped
as invalid by ``load``, or belong to a run that was abandoned).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from .._exceptions import CheckpointCorrupt, CheckpointError, InvalidCheckpoint
from .format import Checkpoint, decode

__all__ = ["CheckpointStore", "Validate", "accept", "check_keep", "none_valid", "report_skipped"]

logger = logging.getLogger("microbatch.checkpoint")

#: ``validate`` callback of a store's ``load``: raises (ideally ``InvalidCheckpoint`` naming the
#: field) when the pipeline cannot resume from a checkpoint, so that the store falls back.
Validate = Callable[[Checkpoint], object]


@runtime_checkable
class CheckpointStore(Protocol):
    """Where a pipeline keeps its checkpoints. All methods block; call them from a worker thread.

    ``location`` names the store in messages; ``skipped`` lists ``(where, why)`` for every invalid
    checkpoint the last ``load`` passed over.
    """

    location: str
    skipped: list[tuple[str, str]]

    def lock(self) -> None:
        """Become the one writer of the store; ``CheckpointError`` naming it while another run is.

        Reading (``load``) needs no lock; ``close()`` releases it. A store that cannot be shared
        by mistake (one held in memory) may do nothing here."""
        ...

    def load(self, validate: Validate | None = None) -> Checkpoint | None:
        """Return the newest valid checkpoint, ``None`` when there is none; ``CheckpointCorrupt``
        when checkpoints exist but none is valid.

        ``validate(checkpoint)`` raises to refuse a checkpoint (``InvalidCheckpoint`` naming the
        field, or any ``Exception``); the store then reports it in ``skipped`` and falls back to
        the previous one (see :func:`accept`)."""
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


def check_keep(keep: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__qualname__}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (checkpoints kept), got {keep}")
    return keep


def report_skipped(location: str, skipped: list[tuple[str, str]], where: str, why: str) -> None:
    skipped.append((where, why))
    logger.warning("skipping invalid checkpoint %s: %s", where, why)


def none_valid(location: str, skipped: list[tuple[str, str]]) -> CheckpointCorrupt:
    reasons = "; ".join(f"{where}: {why}" for where, why in skipped)
    return CheckpointCorrupt(
        f"no valid checkpoint in {location} ({len(skipped)} invalid: {reasons}). Move the store aside "
        f"to keep it for inspection, or pass fresh=True to Pipeline.run (--fresh on the command line) "
        f"to discard it and start over"
    )


def accept(data: bytes, number: int, validate: Validate | None) -> Checkpoint:
    """Decode the checkpoint stored as number ``number`` and run ``validate`` on it.

    Raises ``InvalidCheckpoint`` (a ``ValueError``) saying why it cannot be used. Any ``Exception``
    from ``validate`` counts as invalid, except the ``CheckpointError``s that are not about this one
    checkpoint (a ``CheckpointMismatch`` must stop the resume, not fall back to an older one).
    """
    checkpoint = decode(data)
    if checkpoint.batches != number:
        raise InvalidCheckpoint("batches", f"is {checkpoint.batches}, not the {number} it is stored as")
    if validate is not None:
        try:
            validate(checkpoint)
        except InvalidCheckpoint:
            raise
        except CheckpointError:
            raise
        except Exception as exc:
            raise InvalidCheckpoint(None, f"refused by the pipeline: {type(exc).__name__}: {exc}") from exc
    return checkpoint
