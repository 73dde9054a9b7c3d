"""Many files read as one source, by a glob pattern or a list of paths: :func:`read_files`.

The files are read one after the other, each in large blocks split into lines by the shared line
reader. ``.gz`` files (and ``.zst`` files, with ``zstandard`` installed) are decompressed as they are
read. A position names files by identity, not by name (:mod:`microbatch.checkpoints.identity`: device,
inode, and SHA-256 of the first bytes and of the bytes before an offset), so a file renamed by a
rotation is still the file that was being read, and a new file that took its name is another one::

    {"done": [<identity of each file read to its end>, ...],
     "file": {"id": <identity of the file being read>, "offset": <bytes of lines read in it>} | None}

For a compressed file ``offset`` counts decompressed bytes and the identity covers the whole
compressed file (it is read whole, as one unit; a resumed reading decompresses it again up to the
offset).
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from typing import IO, Any, Literal

import anyio

from .._core.lines import check_encoding
from .._core.params import check_int, check_seconds
from .._exceptions import InvalidCheckpoint, SourceError
from ..checkpoints.identity import FilePosition, fd_position
from ..checkpoints.prefix import PrefixHasher
from .linereader import DEFAULT_MAX_LINE_LENGTH, LineReader, decode_part
from .protocol import Chunk, records_of

__all__ = ["ManyFiles", "read_files"]

logger = logging.getLogger("microbatch.sources")

#: Bytes read from a file (decompressed bytes for a compressed one) per thread hop.
DEFAULT_BLOCK_SIZE = 1 << 20
#: Seconds between two looks for new data or new files when following.
DEFAULT_POLL_INTERVAL = 0.2

_COMPRESSED = (".gz", ".zst")


class ManyFiles:
    """Files matching a pattern (or a list of paths), read as one source (a :class:`Source`).

    Made by :func:`read_files`, which documents the parameters; positions are described in the
    module's docstring. Each ``chunks()`` lists the files anew.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        follow: bool,
        order: Literal["name", "mtime"],
        stop_when_idle: float | None,
        encoding: str | None,
        errors: str,
        block_size: int,
        max_line_length: int,
        poll_interval: float,
        position: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            self.patterns = [os.fspath(paths)]
        else:
            self.patterns = [os.fspath(p) for p in paths]
        if not self.patterns:
            raise ValueError("read_files needs a glob pattern or at least one path")
        if order not in ("name", "mtime"):
            raise ValueError(f"order must be 'name' or 'mtime', got {order!r}")
        check_encoding(encoding, errors)
        check_int("block_size", block_size, minimum=1)
        check_int("max_line_length", max_line_length, minimum=1)
        check_seconds("poll_interval", poll_interval)
        if stop_when_idle is not None:
            check_seconds("stop_when_idle", stop_when_idle)
            if not follow:
                raise ValueError("stop_when_idle ends a followed reading once quiet: it needs follow=True")
        self.follow = follow
        self.order = order
        self.stop_when_idle = stop_when_idle
        self.encoding = encoding
        self.errors = errors
        self.block_size = block_size
        self.max_line_length = max_line_length
        self.poll_interval = poll_interval
        self.done: list[FilePosition] = []
        self.current: tuple[FilePosition, int] | None = None
        if position is not None:
            self.done, self.current = _parse_position(position)
        #: The latest reading ended because no data came for ``stop_when_idle`` seconds.
        self.idle_ended = False

    def __repr__(self) -> str:
        return f"read_files({self.patterns!r}, follow={self.follow}, order={self.order!r})"

    @property
    def where(self) -> str:
        return ", ".join(self.patterns)

    def describe(self) -> str:
        """``files:`` and the absolute patterns: names what is read, for the pipeline's fingerprint."""
        return "files:" + "|".join(os.path.abspath(p) for p in self.patterns)

    def resume(self, position: Any) -> ManyFiles:
        """The files read on after ``position`` (a chunk's position; see the module's docstring)."""
        if position is None:
            return self
        return ManyFiles(
            self.patterns,
            follow=self.follow,
            order=self.order,
            stop_when_idle=self.stop_when_idle,
            encoding=self.encoding,
            errors=self.errors,
            block_size=self.block_size,
            max_line_length=self.max_line_length,
            poll_interval=self.poll_interval,
            position=position,
        )

    def __aiter__(self) -> AsyncGenerator[Any, None]:
        """The records one by one (``chunks()`` is faster: one list per read)."""
        return records_of(self)

    def chunks(self) -> AsyncGenerator[Chunk[Any], None]:
        """The records, one chunk per block read, each with the position after it."""
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[Chunk[Any], None]:
        self.idle_ended = False
        reading = _Reading(self)
        try:
            await anyio.to_thread.run_sync(reading.begin)
            quiet_since = anyio.current_time()
            while True:
                step = await anyio.to_thread.run_sync(reading.step)
                if step is _WAIT:
                    now = anyio.current_time()
                    idle = self.stop_when_idle
                    if idle is not None and now - quiet_since >= idle:
                        self.idle_ended = True
                        logger.info("%s: quiet for stop_when_idle=%g s", self.where, idle)
                        return
                    wait = self.poll_interval if idle is None else min(self.poll_interval, idle)
                    await anyio.sleep(wait)
                    continue
                if step is _END:
                    return
                records, position, error = step
                if records:
                    quiet_since = anyio.current_time()
                    yield Chunk(records, position)
                if error is not None:
                    raise error
        finally:
            reading.close()


_WAIT = object()  # nothing new yet (following)
_END = object()  # every file was read


def _parse_position(position: Any) -> tuple[list[FilePosition], tuple[FilePosition, int] | None]:
    if not isinstance(position, dict) or set(position) != {"done", "file"}:
        raise ValueError(
            f"position {position!r:.200} is not a read_files position ({{'done': [...], 'file': ...}})"
        )
    done = position["done"]
    if not isinstance(done, list):
        raise InvalidCheckpoint("position.done", f"is {done!r:.60}, not a list")
    identities = [FilePosition.from_json(d, field=f"position.done[{i}]") for i, d in enumerate(done)]
    file = position["file"]
    if file is None:
        return identities, None
    if not isinstance(file, dict) or set(file) != {"id", "offset"}:
        raise InvalidCheckpoint("position.file", f"is {file!r:.80}, not {{'id': ..., 'offset': ...}}")
    offset = file["offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidCheckpoint("position.file.offset", f"is {offset!r:.60}, not an int >= 0")
    return identities, (FilePosition.from_json(file["id"], field="position.file.id"), offset)


def _same_inode(path: str, identity: FilePosition) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (identity.file.device, identity.file.inode)


def _is_file(path: str, saved: FilePosition) -> bool:
    """Whether the file at ``path`` is the saved one: same device and inode, same content up to
    the saved offset (so a new file that reuses a deleted file's inode is not taken for it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return saved.file.matches(fd) and saved.holds(fd)
    finally:
        os.close(fd)


class _File:
    """One file being read (blocking methods: called in a worker thread)."""

    def __init__(self, path: str, source: ManyFiles, offset: int) -> None:
        self.path = path
        self.compressed = path.endswith(_COMPRESSED)
        self.hasher = PrefixHasher()
        self.raw: IO[bytes] = open(path, "rb", buffering=0)  # closed by close()
        try:
            self.whole: FilePosition | None = None
            self.stream: IO[bytes] = self.raw
            if self.compressed:
                size = os.fstat(self.raw.fileno()).st_size
                self.whole = fd_position(self.raw.fileno(), size, where=path, verify="sampled")
                self.stream = _decompressed(path, self.raw)
                _skip(self.stream, offset, path)
            elif offset:
                self.raw.seek(offset)
            self.reader = LineReader(
                path,
                start=offset,
                max_line_length=source.max_line_length,
                encoding=source.encoding,
                errors=source.errors,
            )
        except BaseException:
            self.raw.close()
            raise
        self.offset = offset  # just after the last line returned
        self.source = source
        st = os.fstat(self.raw.fileno())
        self.inode = (st.st_dev, st.st_ino)

    def identity(self) -> FilePosition:
        """The identity this file has in positions (read up to ``offset`` for a plain file)."""
        if self.whole is not None:
            return self.whole
        # The hasher keeps the prefix's digests: each position hashes only the bytes read since.
        return fd_position(self.raw.fileno(), self.offset, where=self.path, hasher=self.hasher)

    def read(self) -> tuple[list[Any], SourceError | None] | None:
        """The records of the next block's complete lines; None at the end of the data for now."""
        try:
            data = self.stream.read(self.source.block_size)
        except (EOFError, OSError, ValueError) as exc:
            if not self.compressed:
                raise
            raise SourceError(
                f"{self.path}: cannot decompress it after {self.offset} bytes of lines: "
                f"{type(exc).__name__}: {exc} (a compressed file must be complete when it is read)"
            ) from exc
        if not data:
            return None
        part = self.reader.feed(data)
        records: list[Any] = []
        error: SourceError | None = None
        if part is not None:
            records, error = self._records(part)
        if error is None:
            try:
                self.reader.raise_pending()
            except SourceError as exc:  # a line over max_line_length, after the lines before it
                error = exc
        return records, error

    def finish(self) -> tuple[list[Any], SourceError | None]:
        """The file has ended: its partial last line, as a record."""
        part = self.reader.finish()
        return ([], None) if part is None else self._records(part)

    def _records(self, part: tuple[bytes, bytes, int, int]) -> tuple[list[Any], SourceError | None]:
        source = self.source
        records, error = decode_part(part, source.encoding, source.errors, self.path)
        head, data, end, start = part
        if error is None:
            self.offset = start + len(head) + end
        else:  # just after the lines before the one that does not decode
            lines = head + data[:end]
            self.offset = start + lines.rfind(b"\n", 0, error.offset - start) + 1
        return records, error

    def close(self) -> None:
        try:
            if self.stream is not self.raw:
                self.stream.close()
        finally:
            self.raw.close()


def _decompressed(path: str, raw: IO[bytes]) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    try:
        import zstandard
    except ImportError:
        raise SourceError(
            f"{path}: reading .zst files needs the zstandard package (pip install 'microbatch[zstd]')"
        ) from None
    reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw)
    return reader


def _skip(stream: IO[bytes], offset: int, path: str) -> None:
    left = offset
    while left:
        data = stream.read(min(left, DEFAULT_BLOCK_SIZE))
        if not data:
            raise SourceError(f"{path}: decompressed, it holds fewer than the {offset} bytes already read")
        left -= len(data)


class _Reading:
    """The state of one reading: which files are done, the file being read, those left (blocking)."""

    def __init__(self, source: ManyFiles) -> None:
        self.source = source
        self.done: list[FilePosition] = list(source.done)
        #: The done files' identities as JSON: a new list each time a file is done, never changed
        #: after, so the positions of many chunks share one.
        self.done_json: list[Any] = [d.to_json() for d in self.done]
        self.by_inode: dict[tuple[int, int], list[FilePosition]] = {}
        for d in self.done:
            self.by_inode.setdefault((d.file.device, d.file.inode), []).append(d)
        self.known: dict[tuple[int, int, int, int], bool] = {}  # (dev, ino, size, mtime) -> is done
        self.current: _File | None = None
        self.queue: list[str] = []
        self.draining = False

    def begin(self) -> None:
        saved = self.source.current
        listed = self._list()
        if saved is not None:
            identity, offset = saved
            path = next((p for p in listed if _same_inode(p, identity) and _is_file(p, identity)), None)
            if path is None:
                raise SourceError(
                    f"read_files({self.source.where}): the file being read at the checkpoint (device "
                    f"{identity.file.device}, inode {identity.file.inode}, read up to byte {offset}) is not "
                    f"among the files that match any more: it was deleted, changed or renamed to a name "
                    f"that does not match. Pass fresh=True to Pipeline.run (--fresh on the command line) "
                    f"to start over"
                )
            self.current = _File(path, self.source, offset)
            listed.remove(path)
        self.queue = listed

    def _list(self) -> list[str]:
        """The matching files not done yet (nor being read), in the source's order."""
        found: dict[str, float] = {}
        for pattern in self.source.patterns:
            names = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
            for name in names:
                try:
                    st = os.stat(name)
                except FileNotFoundError:
                    if not glob.has_magic(pattern) and not self.source.follow:
                        raise
                    continue
                if not os.path.isfile(name) or self._is_done(name, st):
                    continue
                if self.current is not None and self.current.inode == (st.st_dev, st.st_ino):
                    continue  # the file being read (held open: its inode cannot be reused)
                found[name] = st.st_mtime
        if self.source.order == "mtime":
            return sorted(found, key=lambda name: (found[name], name))
        return sorted(found)

    def _is_done(self, path: str, st: os.stat_result) -> bool:
        candidates = self.by_inode.get((st.st_dev, st.st_ino))
        if not candidates:
            return False
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        verdict = self.known.get(key)
        if verdict is None:
            verdict = self.known[key] = any(_is_file(path, saved) for saved in candidates)
        return verdict

    def _position(self, file: _File | None) -> dict[str, Any]:
        current = None if file is None else {"id": file.identity().to_json(), "offset": file.offset}
        return {"done": self.done_json, "file": current}

    def _finish_current(self) -> tuple[list[Any], Any, SourceError | None]:
        file = self.current
        assert file is not None
        records, error = file.finish()
        identity = file.identity()
        file.close()
        self.current = None
        self.draining = False
        self.done.append(identity)
        self.done_json = [*self.done_json, identity.to_json()]
        self.by_inode.setdefault((identity.file.device, identity.file.inode), []).append(identity)
        return records, self._position(None), error

    def step(self) -> Any:
        """The next ``(records, position, error)``; ``_WAIT`` (following: nothing new) or ``_END``."""
        while True:
            file = self.current
            if file is None:
                if not self.queue and self.source.follow:
                    self.queue = self._list()
                if not self.queue:
                    return _WAIT if self.source.follow else _END
                self.current = _File(self.queue.pop(0), self.source, 0)
                continue
            got = file.read()
            if got is not None:
                records, error = got
                if records or error is not None:
                    return records, self._position(file), error
                continue
            # The end of the file's data, for now.
            if not self.source.follow or file.compressed or self.draining:
                return self._finish_current()
            if not self.queue:
                self.queue = self._list()
            if not self.queue:
                return _WAIT
            # A newer file exists: the writer has moved on. Read this one to its end once more
            # (lines written just before the switch), then take it as done.
            self.draining = True

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def read_files(
    pattern_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    follow: bool = False,
    order: Literal["name", "mtime"] = "name",
    stop_when_idle: float | None = None,
    encoding: str | None = "utf-8",
    errors: str = "strict",
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> ManyFiles:
    """The lines of many files, one file after the other, as one source.

    - ``pattern_or_paths``: a glob pattern (``"logs/*.log*"``; ``"data/**/*.csv"``: ``**`` matches
      any depth of folders) or a list of paths and patterns. A path without
      wildcards that does not exist raises ``FileNotFoundError`` (unless ``follow``).
    - ``order`` (default ``"name"``): files are read in the order of their names, or with
      ``"mtime"`` of their modification times (oldest first: the order of a rotated log's files).
    - ``.gz`` and ``.zst`` files (``.zst`` needs ``pip install 'microbatch[zstd]'``) are
      decompressed as they are read, each read whole as one unit.
    - ``follow`` (default False): keep looking for new data. The file being read is followed as
      it grows; once a newer matching file appears, it is read to its end once more and the next
      one is read (a rotation: the file renamed away is still recognised by its identity, the
      file that took its name is a new one). New matching files are picked up, checked every
      ``poll_interval`` (default 0.2 s) seconds.
    - ``stop_when_idle`` (with ``follow=True``): end the reading once no new line came for this
      many seconds. A pipeline run that ends so is not finished: the next run reads on from its
      last checkpoint, including the files that appeared since.
    - ``encoding``, ``errors``, ``block_size``, ``max_line_length``: as for :func:`read_lines`.

    Lines end with ``\\n`` or ``\\r\\n``; a file's last line without a newline is a record (when the
    file is done: when not following, or once a newer file appeared). Records are decoded in the
    pipeline's process and sent to workers in batches; a single large plain file is read faster
    with :func:`read_lines`, whose byte ranges the workers read themselves.

    A position names files by identity (see :mod:`microbatch.sources.many`): a resumed reading
    skips the files it read, wherever they are now, and continues the file it was reading at the
    byte where it stopped, also when that file was renamed since (it must still match). A file
    that was compressed after it was read (``app.log.1`` becoming ``app.log.1.gz``) is another
    file: match either the plain or the compressed names, not both, or its lines are read twice.
    A file truncated in place (``copytruncate``) is not followed: use ``read_lines(path,
    follow=True)`` for that.
    """
    return ManyFiles(
        pattern_or_paths,
        follow=follow,
        order=order,
        stop_when_idle=stop_when_idle,
        encoding=encoding,
        errors=errors,
        block_size=block_size,
        max_line_length=max_line_length,
        poll_interval=poll_interval,
    )
