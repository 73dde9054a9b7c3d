"""Following a file like ``tail -F``: waking on change, rotations, truncations, and which file is which.

The loop behind ``read_lines(path, follow=True)`` (:func:`follow_parts`). At the end of the data it
waits for the next change: the folder is watched with the OS notification API (inotify, kqueue,
through ``watchfiles``), with ``poll_interval`` as the longest wait and the fallback when
notifications are unavailable. After every wake-up the open file and the path are checked:

- the open file grew: read on;
- it shrank below the read position (``copytruncate``): where a sibling holds a copy of what was
  read (the same bytes before the read position), the rest is read from the copy, from the same
  offset, then the file again from byte 0: only the lines written between the copy and the
  truncation are lost. Without a copy, the bytes between the read position and the truncation are
  lost; a WARNING names the file; reading restarts at byte 0;
- the path names another file (a rename rotation): the old file, still open, is read to its end,
  then the *next* file is opened. The next file is not simply the one at the path: with rotations
  faster than the reader (``app.log`` → ``app.log.1`` → ``app.log.2``...) whole files would be
  skipped. A resumed reading first reads the files its position names as rotated after its own,
  opened by identity. Then a numbered sibling ``NAME.k`` continues in ``NAME.(k-1)`` (``NAME.1``
  in ``NAME``); otherwise the least recently changed file not read yet, among the path and its
  siblings, that changed no earlier than the old one. A file not read yet may reuse the inode of
  one read and deleted since: files are told apart by their size and first bytes too (:class:`Seen`).

With ``stop_when_idle``, the reading ends once nothing new arrived for that long (a partial last
line stays for the next reading).

A :class:`FileTrail` remembers the files read, in order, with how many records each one ended at,
so that a checkpoint taken while the pipeline folds lines of an older file than the one read now
records the position in the file its offset belongs to, and the files read after it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Sequence
from typing import IO, TYPE_CHECKING, Any

import anyio

from ..checkpoints.identity import FilePosition, FileStamp, fd_position, fd_stamp, open_identified, siblings
from ..checkpoints.prefix import PrefixHasher, Verify
from .linereader import LineReader
from .protocol import Part

if TYPE_CHECKING:
    from .files import LineSource

__all__ = ["FileTrail", "Seen", "Wakeup", "follow_parts", "next_file"]

logger = logging.getLogger("microbatch.sources")

#: Files a trail keeps open for checkpoints at most (the oldest are closed first).
MAX_TRAIL = 64
#: Inodes remembered as read, so that a rotation never goes back to a file read before.
MAX_SEEN = 10_000

_TAIL = 4096  # bytes before the read position compared to find a copytruncate's copy

_NUMBERED = re.compile(r"\.(\d+)$")


class FileTrail:
    """The files one reading of a followed source went through, oldest first.

    Each entry is ``[file or None, records read when it ended or None while current, hasher,
    (bytes read, the last of them)]``; ``None`` for the file means its content is gone (truncated
    in place, no copy found).
    ``records`` counts the records read so far. :meth:`position` is called from a checkpoint's
    worker thread, hence the lock.
    """

    def __init__(self, where: str, verify: Verify = "full") -> None:
        self.where = where
        self.verify: Verify = verify
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
            self.entries.append([f, None, PrefixHasher(), (0, b"")])
            while len(self.entries) > MAX_TRAIL:
                self._drop(0)

    def mark(self, read: int, tail: bytes) -> None:
        """The current file was read up to byte ``read``; ``tail``: the bytes just before it."""
        self.entries[-1][3] = (read, tail)

    def replace(self, f: IO[bytes], copy: IO[bytes]) -> None:
        """The content read from ``f`` lives on in ``copy`` (``f`` was copied, then truncated); the
        reader leaves ``f``, which is closed."""
        with self.lock:
            self._replace(f, copy)
            f.close()

    def _replace(self, f: IO[bytes], copy: IO[bytes]) -> None:
        for entry in self.entries:
            if entry[0] is f:
                entry[0], entry[2] = copy, PrefixHasher()

    def _drop(self, index: int) -> None:
        f = self.entries.pop(index)[0]
        if f is not None and all(e[0] is not f for e in self.entries):
            f.close()

    def position(self, offset: int, records: int) -> FilePosition | None:
        """The position of the ``records``-th record read, which ends at ``offset`` in its file,
        with the files read after that one as ``pending``.

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
            entry = self.entries[0]
            f, _, hasher, (read, tail) = entry
            if f is not None and not f.closed and tail and _pread(f, read - len(tail), len(tail)) != tail:
                # Truncated and written again since it was read (copytruncate): the reader has not
                # seen it yet. What it read lives on in the copy, if one was made.
                copy, _ = _copy_of(self.where, read, tail)
                f = None if copy is None else _open_copy(copy, read, tail)
                if f is not None:
                    self._replace(entry[0], f)
            if f is None or f.closed:
                logger.warning(
                    "%s: the file holding byte offset %d was truncated since: no identity recorded",
                    self.where, offset,
                )
                return None
            later = {id(e[0]): e[0] for e in self.entries[1:] if e[0] is not None and e[0] is not f}
            pending = [fd_stamp(g.fileno()) for g in later.values() if not g.closed]
            return fd_position(f.fileno(), offset, where=self.where, verify=self.verify, hasher=hasher,
                               pending=pending)


def _pread(f: IO[bytes], start: int, length: int) -> bytes:
    return os.pread(f.fileno(), length, start)


class Seen:
    """The files a reading went through, so that a rotation never goes back to one of them.

    A file is known by device and inode, and by its size and first bytes when it was left: a
    file deleted since may leave its inode to a new file, which is not one read before. A file
    unchanged since it was left (same size and modification time) is not read again to tell.
    """

    def __init__(self) -> None:
        #: (device, inode) -> None while open, else (stamp, size, mtime) when it was left.
        self.files: OrderedDict[tuple[int, int], tuple[FileStamp, int, int] | None] = OrderedDict()

    def add(self, f: IO[bytes]) -> None:
        st = os.fstat(f.fileno())
        self.files[(st.st_dev, st.st_ino)] = None  # open: its inode cannot be another file's
        while len(self.files) > MAX_SEEN:
            self.files.popitem(last=False)

    def replaced(self, f: IO[bytes], copy: IO[bytes]) -> None:
        """``f`` was truncated after ``copy`` was made of it: the file ``f`` is now is a new one,
        the one read before is ``copy``."""
        self.add(copy)
        st, stamp = os.fstat(f.fileno()), fd_stamp(copy.fileno())
        old = FileStamp(st.st_dev, st.st_ino, stamp.size, stamp.head_length, stamp.head)
        self.files[(st.st_dev, st.st_ino)] = (old, -1, -1)

    def leave(self, f: IO[bytes]) -> None:
        """Reading left ``f``, which may be closed later: remember what it looked like."""
        st = os.fstat(f.fileno())
        self.files[(st.st_dev, st.st_ino)] = (fd_stamp(f.fileno()), st.st_size, st.st_mtime_ns)

    def __contains__(self, item: tuple[str, os.stat_result]) -> bool:
        name, st = item
        key = (st.st_dev, st.st_ino)
        if key not in self.files:
            return False
        left = self.files[key]
        if left is None or (st.st_size, st.st_mtime_ns) == left[1:]:
            return True
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            return True  # gone since it was listed: nothing to read there
        try:
            return left[0].matches(fd)
        finally:
            os.close(fd)


def _suffix_number(path: str, base: str) -> int | None:
    if path == base:
        return 0
    match = _NUMBERED.search(path)
    if match and path[: match.start()] == base:
        return int(match.group(1))
    return None


def next_file(path: str, current: IO[bytes], seen: Seen) -> IO[bytes] | None:
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
    unseen = [(n, st) for n, st in found if (n, st) not in seen]
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


def _read(f: IO[bytes], size: int, tail: bytes) -> bytes | None:
    """The next read of ``f``; ``None`` (at the old position) when the bytes before it are no longer
    ``tail``: truncated and written again past the read position before the reader looked (blocks)."""
    position = f.tell()
    data = f.read(size)
    if data and tail and os.pread(f.fileno(), len(tail), position - len(tail)) != tail:
        f.seek(position)
        return None
    return data


def _check(path: str, f: IO[bytes], rewritten: bool = False) -> tuple[str, int]:
    """After the end of the data: ``("data" | "truncated" | "rotated" | "idle", size)`` (blocks).

    ``rewritten``: the file no longer holds what was read before the position (see :func:`_read`).
    """
    position = f.tell()
    current = os.fstat(f.fileno())
    if current.st_size < position or rewritten:
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


def _open_pending(path: str, pending: deque[FileStamp]) -> IO[bytes] | None:
    """Open the next of the files a resumed position names as rotated after its own (blocks)."""
    while pending:
        stamp = pending.popleft()
        found = open_identified(path, stamp, copies=True)
        if found is not None:
            return found[0]
        logger.warning(
            "%s: the file rotated after it (inode %d, %d bytes) is gone: its lines are skipped",
            path, stamp.inode, stamp.size,
        )
    return None


def _open_copy(name: str, position: int, tail: bytes) -> IO[bytes] | None:
    try:
        f = open(name, "rb", buffering=0)  # closed by the trail
    except OSError:
        return None
    if os.pread(f.fileno(), len(tail), position - len(tail)) == tail:
        f.seek(position)
        return f
    f.close()
    return None


async def follow_parts(
    source: LineSource[Any], f: IO[bytes], start: int, pending: Sequence[FileStamp] = ()
) -> AsyncGenerator[Part, None]:
    """The parts of a followed file opened as ``f`` at ``start``, then of the files after it
    (``pending`` first: those a resumed position names); ends only after ``stop_when_idle``.

    Records the files read in ``source.trail``; the trail, not this loop, closes them.
    """
    path, where = source.path, source.path
    trail = source.trail = FileTrail(where, source.verify)
    source.idle_ended = False
    trail.add(f)
    seen = Seen()
    seen.add(f)
    waiting = deque(pending)
    reader = LineReader(
        where, start=start, max_line_length=source.max_line_length, encoding=source.encoding,
        errors=source.errors,
    )
    wakeup = Wakeup(path, source.poll_interval)
    block_size, tail = source.block_size, b""
    quiet, idle_since = source.stop_when_idle, anyio.current_time()
    copy: str | None = None  # the name of the copytruncate copy being read, if it is one
    try:
        while True:
            data = await anyio.to_thread.run_sync(_read, f, block_size, tail)
            if data:
                idle_since = anyio.current_time()
                tail = (tail + data)[-_TAIL:] if len(data) < _TAIL else data[-_TAIL:]
                trail.mark(reader.position + reader.pending + len(data), tail)
                part = reader.feed(data)
                if part is not None:
                    trail.records += _count(part[1], part[2])
                    yield part
                reader.raise_pending()
                continue
            state, now = await anyio.to_thread.run_sync(_check, path, f, data is None)
            if state == "data":
                continue
            new: IO[bytes] | None = None
            if state == "rotated":
                if waiting:
                    new = await anyio.to_thread.run_sync(_open_pending, path, waiting)
                if new is None:
                    new = await anyio.to_thread.run_sync(next_file, path, f, seen)
            if state in ("idle", "rotated") and new is None:
                if quiet is not None and anyio.current_time() - idle_since >= quiet:
                    source.idle_ended = True  # its input goes on: a checkpoint is not "finished"
                    return  # a partial last line waits for the next reading
                await wakeup.wait()
                continue
            torn = None
            if new is not None:
                logger.info("%s: rotated; the old file was read to its end, reading %s from byte 0",
                            where, new.name)
                await anyio.to_thread.run_sync(seen.leave, f)
                f = new
                seen.add(f)
                torn, copy = copy, None
            else:
                position = f.tell()
                copy, lost = await anyio.to_thread.run_sync(_copy_of, path, position, tail)
                opened = None
                if copy is not None:
                    opened = await anyio.to_thread.run_sync(_open_copy, copy, position, tail)
                if opened is not None:
                    # What the file held past the read position before the truncation is in the copy:
                    # read it there, from the same offset, then the files after the copy: the
                    # truncated file from byte 0, or the next copy if it was truncated again.
                    logger.warning(
                        "%s: truncated at byte %d (copytruncate): reading the %d bytes written after "
                        "that from its copy %s, then the files written after the copy (lines written "
                        "between the copy and the truncation are lost)", where, position, lost, copy,
                    )
                    await anyio.to_thread.run_sync(seen.replaced, f, opened)
                    trail.replace(f, opened)  # and closes f: the file it is now is found as the next
                    f = opened
                    continue
                copy = None
                logger.warning(
                    "%s: truncated at byte %d (now %d bytes) and no copy of it found beside it: "
                    "the bytes written after byte %d before the truncation were skipped (how many "
                    "is unknown); reading again from byte 0", where, position, now, position,
                )
                await anyio.to_thread.run_sync(f.seek, 0)
            # The file this partial line belongs to has ended: it will not be completed. A copy
            # ends in part of a line when the writer was inside it: its rest went to the file
            # before the truncation took it away, so the part is no record.
            part = reader.finish()
            if part is not None and torn is not None:
                logger.warning(
                    "%s: the copy %s ends in a partial line (%d bytes), the rest of which was "
                    "truncated away: dropped", where, torn, len(part[1]),
                )
            elif part is not None:
                trail.records += _count(part[1], part[2])
                yield part
            trail.add(f)
            reader.reset(0)
            tail = b""
            idle_since = anyio.current_time()
    finally:
        wakeup.close()
