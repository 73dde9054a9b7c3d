"""Following a file like ``tail -F``: waking on change, rotations, truncations, and which file is which.

The loop behind ``read_lines(path, follow=True)`` (:func:`follow_parts`). At the end of the data it
waits for the next change: the folder is watched with the OS notification API (inotify, kqueue,
through ``watchfiles``), with ``poll_interval`` as the longest wait and the fallback when
notifications are unavailable. After every wake-up the open file and the path are checked:

- the open file grew: read on;
- it shrank below the read position (``copytruncate``): the bytes between the read position and the
  size seen last are lost; a WARNING names the file and that count; reading restarts at byte 0;
- the path names another file (a rename rotation): the old file, still open, is read to its end,
  then the *next* file is opened. The next file is not simply the one at the path: with rotations
  faster than the reader (``app.log`` → ``app.log.1`` → ``app.log.2``...) whole files would be
  skipped. A numbered sibling ``NAME.k`` continues in ``NAME.(k-1)`` (``NAME.1`` in ``NAME``);
  otherwise the least recently changed file not read yet, among the path and its siblings, that
  changed no earlier than the old one.

A :class:`FileTrail` remembers the files read, in order, with how many records each one ended at,
so that a checkpoint taken while the pipeline folds lines of an older file than the one read now
records the identity of the file its offset belongs to.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import IO, TYPE_CHECKING, Any

import anyio

from ..checkpoints.identity import FileIdentity, fd_identity, siblings
from .linereader import LineReader
from .protocol import Part

if TYPE_CHECKING:
    from .files import LineSource

__all__ = ["FileTrail", "Wakeup", "follow_parts", "next_file"]

logger = logging.getLogger("microbatch.sources")

#: Files a trail keeps open for checkpoints at most (the oldest are closed first).
MAX_TRAIL = 64
#: Inodes remembered as read, so that a rotation never goes back to a file read before.
MAX_SEEN = 10_000

_TAIL = 4096  # bytes before the read position compared to find a copytruncate's copy

_NUMBERED = re.compile(r"\.(\d+)$")


class FileTrail:
    """The files one reading of a followed source went through, oldest first.

    Each entry is ``[file or None, records read when it ended or None while current]``; ``None``
    for the file means its content is gone (truncated in place). ``records`` counts the records
    read so far. :meth:`identity` is called from a checkpoint's worker thread, hence the lock.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.records = 0
        self.entries: list[list[Any]] = []
        self.lock = threading.Lock()
        # The files stay open after the reading ends (the final checkpoint comes after it).
        weakref.finalize(self, FileTrail._close_all, self.entries)

    @staticmethod
    def _close_all(entries: list[list[Any]]) -> None:
        for f in {id(e[0]): e[0] for e in entries if e[0] is not None}.values():
            f.close()

    def add(self, f: IO[bytes]) -> None:
        """Reading goes on in ``f`` (a new file, or the same one truncated)."""
        with self.lock:
            if self.entries:
                last = self.entries[-1]
                last[1] = self.records
                if last[0] is f:
                    last[0] = None  # truncated in place: the old content is gone
            self.entries.append([f, None])
            while len(self.entries) > MAX_TRAIL:
                self._drop(0)

    def _drop(self, index: int) -> None:
        f = self.entries.pop(index)[0]
        if f is not None and all(e[0] is not f for e in self.entries):
            f.close()

    def identity(self, offset: int, records: int) -> FileIdentity | None:
        """The identity of the file the ``records``-th record read ends in, up to ``offset``.

        ``records`` counts from the start of this reading. Files before that one are closed:
        checkpoints come in order. ``None`` when that file's content is gone (truncated) or it
        was closed (more than ``MAX_TRAIL`` files behind).
        """
        with self.lock:
            index = next(
                (i for i, e in enumerate(self.entries) if e[1] is None or e[1] >= records), None
            )
            if index is None:
                return None
            for _ in range(index):
                self._drop(0)
            f = self.entries[0][0]
            if f is None or f.closed:
                logger.warning(
                    "%s: the file holding byte offset %d was truncated since: no identity recorded",
                    self.where, offset,
                )
                return None
            return fd_identity(f.fileno(), offset, where=self.where)


def _suffix_number(path: str, base: str) -> int | None:
    if path == base:
        return 0
    match = _NUMBERED.search(path)
    if match and path[: match.start()] == base:
        return int(match.group(1))
    return None


def next_file(path: str, current: IO[bytes], seen: OrderedDict[tuple[int, int], None]) -> IO[bytes] | None:
    """Open the file written after ``current`` (see the module's docstring), or ``None`` if none yet.

    Blocks (``stat`` of the siblings); call it in a worker thread.
    """
    here = os.fstat(current.fileno())
    found: list[tuple[str, os.stat_result]] = []
    for name in [path, *siblings(path)]:
        try:
            found.append((name, os.stat(name)))
        except OSError:  # noqa: PERF203 - once per sibling, after a rotation
            continue
    unseen = [(n, st) for n, st in found if (st.st_dev, st.st_ino) not in seen]
    choice: str | None = None
    where = next((n for n, st in found if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)), None)
    number = None if where is None else _suffix_number(where, path)
    if number:
        wanted = path if number == 1 else f"{path}.{number - 1}"
        choice = next((n for n, _ in unseen if n == wanted), None)
    if choice is None:
        later = [(st.st_mtime_ns, n == path, -(_suffix_number(n, path) or 0), n) for n, st in unseen
                 if st.st_mtime_ns >= here.st_mtime_ns]
        if later:
            choice = min(later)[3]
    if choice is None:
        return None
    stat = next(st for n, st in unseen if n == choice)
    try:
        f = open(choice, "rb", buffering=0)  # closed by the trail
    except OSError:
        return None
    opened = os.fstat(f.fileno())
    if (opened.st_dev, opened.st_ino) != (stat.st_dev, stat.st_ino):
        f.close()  # renamed again between the listing and the open: look again
        return None
    return f


class Wakeup:
    """Waits until something in the folder of ``path`` changes, at most ``poll_interval`` seconds.

    Uses ``watchfiles``' notifier (inotify, kqueue, ...); where it cannot start, waits
    ``poll_interval`` (polling). Close it with :meth:`close`.
    """

    def __init__(self, path: str, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self.notify: Any = None
        try:
            from watchfiles._rust_notify import RustNotify

            folder = os.path.dirname(os.path.abspath(path))
            self.notify = RustNotify([folder], False, False, 50, False, False)
        except Exception as exc:  # no notifications (limits reached, unsupported): poll
            logger.debug("%s: no file notifications (%s); polling every %g s", path, exc, poll_interval)

    async def wait(self) -> None:
        if self.notify is None:
            await anyio.sleep(self.poll_interval)
            return
        timeout = max(1, int(self.poll_interval * 1000))
        # Not abandoned on cancellation: the notifier must not close under a waiting thread; a
        # cancellation therefore waits at most poll_interval.
        await anyio.to_thread.run_sync(self.notify.watch, 5, 2, timeout, None)

    def close(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def _count(data: bytes, end: int) -> int:
    """Records in a part's ``data[:end]`` (the lines the pipeline's reader counts)."""
    count = data.count(b"\n", 0, end)
    return count + 1 if data[end - 1] != 10 else count


def _check(path: str, f: IO[bytes]) -> tuple[str, int]:
    """After the end of the data: ``("data" | "truncated" | "rotated" | "idle", size)`` (blocks)."""
    position = f.tell()
    current = os.fstat(f.fileno())
    if current.st_size < position:
        return "truncated", current.st_size
    if current.st_size > position:
        return "data", current.st_size
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return "rotated", current.st_size  # moved away: a sibling may continue it already
    if (at_path.st_ino, at_path.st_dev) != (current.st_ino, current.st_dev):
        return "rotated", current.st_size
    return "idle", current.st_size


def _copy_of(path: str, position: int, tail: bytes) -> tuple[str | None, int]:
    """The sibling holding a copy of a truncated file (its bytes before ``position`` are ``tail``),
    and how many bytes it holds past ``position``; ``(None, 0)`` if none does (blocks)."""
    for name in siblings(path):
        try:
            with open(name, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size >= position and os.pread(f.fileno(), len(tail), position - len(tail)) == tail:
                    return name, size - position
        except OSError:  # noqa: PERF203 - once per sibling, after a truncation
            continue
    return None, 0


async def follow_parts(source: LineSource[Any], f: IO[bytes], start: int) -> AsyncGenerator[Part, None]:
    """The parts of a followed file opened as ``f`` at ``start``; never ends by itself.

    Records the files read in ``source.trail``; the trail, not this loop, closes them.
    """
    path, where = source.path, source.path
    trail = source.trail = FileTrail(where)
    trail.add(f)
    st = os.fstat(f.fileno())
    seen: OrderedDict[tuple[int, int], None] = OrderedDict({(st.st_dev, st.st_ino): None})
    reader = LineReader(
        where, start=start, max_line_length=source.max_line_length, encoding=source.encoding,
        errors=source.errors,
    )
    wakeup = Wakeup(path, source.poll_interval)
    block_size, tail = source.block_size, b""
    try:
        while True:
            data = await anyio.to_thread.run_sync(f.read, block_size)
            if data:
                tail = (tail + data)[-_TAIL:] if len(data) < _TAIL else data[-_TAIL:]
                part = reader.feed(data)
                if part is not None:
                    trail.records += _count(part[1], part[2])
                    yield part
                reader.raise_pending()
                continue
            state, now = await anyio.to_thread.run_sync(_check, path, f)
            if state == "data":
                continue
            if state == "idle":
                await wakeup.wait()
                continue
            if state == "rotated":
                new = await anyio.to_thread.run_sync(next_file, path, f, seen)
                if new is None:
                    await wakeup.wait()
                    continue
                logger.info("%s: rotated; the old file was read to its end, reading %s from byte 0",
                            where, new.name)
                f = new
                st = os.fstat(f.fileno())
                seen[(st.st_dev, st.st_ino)] = None
                while len(seen) > MAX_SEEN:
                    seen.popitem(last=False)
            else:
                position = f.tell()
                copy, lost = await anyio.to_thread.run_sync(_copy_of, path, position, tail)
                if copy is None:
                    logger.warning(
                        "%s: truncated at byte %d (now %d bytes) and no copy of it found beside it: "
                        "the bytes written after byte %d before the truncation were skipped (how many "
                        "is unknown); reading again from byte 0", where, position, now, position,
                    )
                else:
                    logger.warning(
                        "%s: truncated at byte %d (copytruncate): %d bytes written after that, found "
                        "in its copy %s, were skipped; reading again from byte 0",
                        where, position, lost, copy,
                    )
                await anyio.to_thread.run_sync(f.seek, 0)
            # The file this partial line belongs to has ended: it will not be completed.
            part = reader.finish()
            if part is not None:
                trail.records += _count(part[1], part[2])
                yield part
            trail.add(f)
            reader.reset(0)
            tail = b""
    finally:
        wakeup.close()
