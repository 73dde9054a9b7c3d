"""Byte-range splits of a regular file, and the rule that says which split owns which line.

A file read without ``follow`` is cut into splits that workers read themselves: the pipeline sends
a :class:`FileSplit` (a path and a byte range), never the bytes. Hadoop's line-reader rule decides
ownership: **a split owns the lines that start inside** ``[start, end)``. A split therefore skips
the partial line it begins in (unless it begins at a line start: offset 0, or the byte before
``start`` is a newline) and reads past ``end`` to finish its last line. Splits never overlap and
never lose a line, whatever their size and however long the lines.

Split boundaries lie on a fixed grid counted from offset 0 (:func:`plan_splits`): every
``split_size`` bytes, and closer together in the first ``split_size`` bytes (at 1/8, 1/4 and 1/2
of it) so that the first results of a run come sooner. A run resumed at any line start (a batch's
end) plans the rest of its split up to the next grid point, then the same splits an uninterrupted
run had. Inside a split, batches of ``max_size`` lines
are cut from its first line, so a resume at a batch end also cuts the same batches after it.

Standard library only: worker processes import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["FileSplit", "SourceSplit", "next_boundary", "owned_range", "plan_splits"]


class FileSplit:
    """One split on its way to a worker: read ``path``'s lines that start in ``[start, end)``.

    ``max_size`` is the number of lines per batch cut inside the split, ``max_line_length`` the
    longest line (bytes, without its newline) accepted. Immutable; a plain class (not a dataclass)
    so that unpickling one in a worker imports nothing more.
    """

    __slots__ = ("path", "start", "end", "max_size", "max_line_length")

    path: str
    start: int
    end: int
    max_size: int
    max_line_length: int

    def __init__(self, path: str, start: int, end: int, max_size: int, max_line_length: int) -> None:
        if not 0 <= start <= end:
            raise ValueError(f"FileSplit of {path}: need 0 <= start <= end, got start={start}, end={end}")
        if max_size < 1 or max_line_length < 1:
            raise ValueError(
                f"FileSplit of {path}: max_size and max_line_length must be >= 1, "
                f"got {max_size} and {max_line_length}"
            )
        setattr_ = object.__setattr__
        setattr_(self, "path", path)
        setattr_(self, "start", start)
        setattr_(self, "end", end)
        setattr_(self, "max_size", max_size)
        setattr_(self, "max_line_length", max_line_length)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"FileSplit is immutable: cannot set {name!r}")

    def _key(self) -> tuple[str, int, int, int, int]:
        return (self.path, self.start, self.end, self.max_size, self.max_line_length)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileSplit):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"FileSplit({self.path!r}, start={self.start}, end={self.end})"

    def __reduce__(self) -> tuple[type[FileSplit], tuple[str, int, int, int, int]]:
        return (FileSplit, self._key())


class SourceSplit:
    """A split that a worker reads from a source other than a file: ``[start, end)`` in the source's
    own numbering (a stream's sequences), cut into batches of ``max_size`` records.

    The pipeline handles it as a :class:`FileSplit`: one call per split, one outcome per batch, and
    when the call fails the pipeline process reads the split itself and runs its batches one by one.
    A subclass says how (its methods run in a worker, or in the pipeline process for a fallback) and
    what position follows a record numbered ``end - 1``. ``path`` names the source in messages.
    """

    __slots__ = ()

    path: str
    start: int
    end: int
    max_size: int

    def read(self, task: Any) -> list[tuple[int, int, int, Any]]:
        """In a worker: ``(count, start, end, result)`` of each batch, ``task.fn`` called on each
        (as :class:`~microbatch._core.splittask.SplitTask` does for a file)."""
        raise NotImplementedError

    def read_here(self, task: Any, start: int, end: int) -> list[tuple[list[Any], int, int, list[Any]]]:
        """In the pipeline process: the batches of records in ``[start, end)``, as
        ``(records, start, end, undecodable)``, ``undecodable`` as in
        :class:`~microbatch._core.splittask.Undecodable`."""
        raise NotImplementedError

    def position(self, end: int) -> Any:
        """The source position after the records before ``end`` (what a checkpoint records)."""
        raise NotImplementedError

    def note(self, start: int, end: int, count: int) -> None:
        """In the pipeline process: a batch of ``count`` records came from ``[start, end)`` (a
        source may count what it passed over); nothing by default."""


def next_boundary(offset: int, split_size: int) -> int:
    """The first grid point after ``offset``: ``split_size // 8``, ``// 4``, ``// 2``, then the
    multiples of ``split_size``."""
    if offset < split_size:
        for part in (8, 4, 2):
            point = split_size // part
            if point > offset:
                return point
        return split_size
    return (offset // split_size + 1) * split_size


def plan_splits(start: int, size: int, split_size: int | Callable[[], int]) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` byte ranges that cover ``[start, size)``, cut on the grid.

    The first range runs from ``start`` to the next grid point (:func:`next_boundary`) or ``size``,
    the others from one grid point to the next; the last ends at ``size``. Nothing when
    ``start >= size``. The same ``size`` and ``split_size`` give the same ranges after any
    ``start``. A callable ``split_size`` is asked before each range: the grid of the size it
    gives then (sizes that are powers of two keep the larger grid's points).
    """
    if isinstance(split_size, int) and split_size < 1:
        raise ValueError(f"split_size must be >= 1 byte, got {split_size}")
    if start < 0:
        raise ValueError(f"start must be a byte offset >= 0, got {start}")
    lo = start
    while lo < size:
        step = split_size if isinstance(split_size, int) else split_size()
        hi = min(next_boundary(lo, step), size)
        yield lo, hi
        lo = hi


def owned_range(data: bytes, offset: int, start: int, end: int, at_eof: bool) -> tuple[int, int] | None:
    """Where the lines owned by split ``[start, end)`` lie in ``data`` (bytes from ``offset`` on).

    ``data`` must begin at or before ``start - 1`` (at ``0`` when ``start`` is 0); ``at_eof``
    says ``data`` runs to the end of the file. Returns ``(lo, hi)``, indexes into ``data``: the
    owned lines are ``data[lo:hi]``. Returns None when ``data`` does not reach far enough to tell
    (no newline yet to end the partial first line or the last owned line, and not at the end of the
    file). ``lo == hi`` when the split owns no line. The pure form of the rule, for tests and for
    readers that hold the bytes; :mod:`microbatch._core.splittask` applies it to a file in blocks.
    """
    if start == 0:
        lo = 0 - offset
    else:
        if offset > start - 1:
            raise ValueError(f"data starts at {offset}, after byte start - 1 = {start - 1}")
        nl = data.find(b"\n", start - 1 - offset)
        if nl == -1:
            return (len(data), len(data)) if at_eof else None
        lo = nl + 1
    if lo + offset >= end:
        return lo, lo
    nl = data.find(b"\n", max(end - 1 - offset, lo))
    if nl == -1:
        return (lo, len(data)) if at_eof else None
    return lo, nl + 1
