"""Blocks of complete lines as raw bytes, and the pure operations on them.

This module is imported inside worker processes, so it uses the standard library only and does no
I/O. A :class:`LineBlock` is what a line source ships to a worker: one ``bytes`` object holding many
complete lines (pickling one ``bytes`` costs microseconds, a list of 10,000 ``str`` about a
millisecond). The worker splits it into records with :func:`decode_lines`; the pipeline's reader
cuts what it reads into batches of an exact number of lines with :func:`cut_parts`, and bisection
halves a batch with :func:`cut_lines`. None of them runs a Python loop per line in the common case.

Lines end with ``b"\\n"``; a ``b"\\r"`` right before it is part of the terminator (CRLF). Encodings
must be ASCII-compatible (UTF-8, Latin-1, cp1252, ...), so that byte ``0x0A`` always means newline.

:class:`LineSplitter` is the pure core of the file and socket readers: fed raw bytes, it returns
the bytes of complete lines, keeps the partial last line, and enforces ``max_line_length``.
"""

from __future__ import annotations

import codecs
from typing import Any

from .._exceptions import LineTooLong, SourceDecodeError

__all__ = [
    "LineBlock",
    "LineSplitter",
    "check_encoding",
    "find_long_line",
    "cut_lines",
    "cut_parts",
    "decode_lines",
    "decode_parts",
]


class LineBlock:
    """``count`` complete lines of a source as raw bytes, with their exact byte positions.

    Every line in ``data`` ends with ``b"\\n"`` except possibly the very last line of a file read
    to its end (then ``end`` is the file size). ``start`` is the byte offset of ``data[0]`` in the
    source and ``end == start + len(data)`` the offset just after the block: resuming a source at
    ``end`` continues with the next line.

    Immutable, compared and hashed by value. A plain class rather than a dataclass: worker
    processes unpickle one per batch, and importing ``dataclasses`` (with ``inspect``) would add
    to every worker's start.
    """

    __slots__ = ("data", "count", "start", "end")

    data: bytes
    count: int
    start: int
    end: int

    def __init__(self, data: bytes, count: int, start: int, end: int) -> None:
        if end != start + len(data):
            raise ValueError(f"LineBlock end={end} must equal start + len(data) = {start + len(data)}")
        if count < 0:
            raise ValueError(f"LineBlock count must be >= 0, got {count}")
        setattr_ = object.__setattr__
        setattr_(self, "data", data)
        setattr_(self, "count", count)
        setattr_(self, "start", start)
        setattr_(self, "end", end)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"LineBlock is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"LineBlock is immutable: cannot delete {name!r}")

    def _key(self) -> tuple[bytes, int, int, int]:
        return (self.data, self.count, self.start, self.end)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LineBlock):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"LineBlock(data={self.data!r}, count={self.count}, start={self.start}, end={self.end})"

    def __reduce__(self) -> tuple[type[LineBlock], tuple[bytes, int, int, int]]:
        return (LineBlock, self._key())


def check_encoding(encoding: str | None, errors: str) -> None:
    """Raise ``ValueError``/``LookupError`` naming the parameter when it cannot split lines.

    ``encoding`` must exist and be ASCII-compatible (``"\\n"`` encodes to ``b"\\n"``): UTF-16 and
    UTF-32 are refused because a line could not be found by its newline byte. ``errors`` must be a
    registered codec error handler (``"strict"``, ``"replace"``, ``"ignore"``,
    ``"backslashreplace"``, ``"surrogateescape"``, ...).
    """
    if encoding is not None:
        try:
            info = codecs.lookup(encoding)
        except LookupError:
            raise LookupError(f"encoding={encoding!r} is not a known codec") from None
        if "\n".encode(info.name) != b"\n" or "a".encode(info.name) != b"a":
            raise ValueError(
                f"encoding={encoding!r} is not ASCII-compatible; line sources need an encoding "
                f"where newline is the byte 0x0A (e.g. 'utf-8', 'latin-1'), or encoding=None for bytes"
            )
    try:
        codecs.lookup_error(errors)
    except LookupError:
        raise LookupError(
            f"errors={errors!r} is not a codec error handler; use 'strict', 'replace', "
            f"'ignore', 'backslashreplace' or 'surrogateescape'"
        ) from None


def decode_lines(
    data: bytes, *, encoding: str | None, errors: str, where: str, start: int
) -> list[str] | list[bytes]:
    """Split ``data`` (complete lines) into records without their ``\\n`` or ``\\r\\n`` terminators.

    ``encoding=None`` keeps the records as ``bytes``. A last line without a newline is a record;
    empty ``data`` gives no record. A lone ``\\r`` (not before ``\\n``) stays in its record.
    Undecodable bytes raise :class:`SourceDecodeError` naming ``where`` and the absolute byte offset
    (``start`` plus the position in ``data``) unless ``errors`` chooses another handler
    (``"replace"``, ``"ignore"``, ...).
    """
    if not data:
        return []
    if encoding is None:
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        records = data.split(b"\n")
    else:
        try:
            text = data.decode(encoding, errors)
        except UnicodeDecodeError as exc:
            raise SourceDecodeError(where, start + exc.start, encoding, exc.reason) from exc
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        records = text.split("\n")  # type: ignore[assignment]
    if not records[-1]:
        # data ended with a newline: the piece after it is not a line.
        records.pop()
    return records


#: Codecs that decode each byte sequence the same wherever it is cut at a newline (no state, no
#: byte order mark): for them :func:`decode_parts` decodes the lines in place.
_STATELESS_CODECS = frozenset({"utf-8", "ascii", "iso8859-1", "cp1252"})


def decode_parts(
    head: bytes, data: bytes, end: int, *, encoding: str | None, errors: str, where: str, start: int
) -> list[str] | list[bytes]:
    """``decode_lines(head + data[:end], ...)``, without building ``head + data[:end]``.

    ``head`` (possibly empty) is the start of the first line; ``data[:end]`` holds the rest of the
    lines; what follows ``end`` is ignored. When it can, this splits or decodes ``data`` where it
    lies (no copy of the block, no second pass over it); otherwise (``\\r`` in ``bytes`` records,
    a codec with state, undecodable bytes) it joins the parts and calls :func:`decode_lines`, so
    the records and errors are exactly those of :func:`decode_lines`.
    """
    records = _decode_in_place(head, data, end, encoding, errors)
    if records is not None:
        return records
    lines = b"".join((head, memoryview(data)[:end])) if head else data[:end]
    return decode_lines(lines, encoding=encoding, errors=errors, where=where, start=start)


def _decode_in_place(
    head: bytes, data: bytes, end: int, encoding: str | None, errors: str
) -> list[Any] | None:
    """The records of ``head + data[:end]`` decoded in place, or ``None`` to take the general way."""
    if not end:
        return None
    if encoding is None:
        # Split all of ``data``: its pieces after ``end`` are the partial line, popped below.
        if b"\r" in data or b"\r" in head or data.rfind(b"\n", end) != -1:
            return None
        records: list[Any] = data.split(b"\n")
        if end < len(data) or not records[-1]:
            records.pop()  # the partial line after ``end``, or the empty piece after a last newline
        if head:
            records[0] = head + records[0]
        return records
    if codecs.lookup(encoding).name not in _STATELESS_CODECS:
        return None
    lo = 0
    first: str | None = None
    try:
        if head:
            # The first line is split between ``head`` and ``data``, perhaps inside a character.
            lo = data.find(b"\n", 0, end) + 1
            if not lo:
                return None
            first = (head + data[:lo]).decode(encoding, errors)
        text = str(memoryview(data)[lo:end], encoding, errors)
    except UnicodeDecodeError:
        return None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    records = text.split("\n")
    if not records[-1]:
        records.pop()
    if first is not None:
        first = first[:-1]  # its newline
        if first.endswith("\r"):
            first = first[:-1]
        records.insert(0, first)
    return records


def _nth_newline(data: bytes, n: int, lo: int, hi: int, before_lo: int, before_hi: int) -> int:
    """Index of the ``n``-th newline (1-based) of ``data``, known to lie in ``data[lo:hi]``.

    ``before_lo``/``before_hi`` count the newlines in ``data[:lo]``/``data[:hi]``. The search
    interpolates from the average line length and counts with ``bytes.count`` (C speed), halving the
    range every other step so that uneven line lengths cannot make it slow; only the last few lines
    are walked with ``bytes.find``.
    """
    step = 0
    while n - before_lo > 16 and hi - lo > 4096:
        guess = lo + (hi - lo) * (n - before_lo) // (before_hi - before_lo)
        if step % 2:
            # Move toward the middle, but at most `slack` bytes from the estimate: with even line
            # lengths the answer lies close to it, and the slack doubles on every step, so uneven
            # lines still halve the range within a few steps.
            slack = 4096 << step
            guess = min(max((lo + hi) // 2, guess - slack), guess + slack)
        guess = min(max(guess, lo + 1), hi - 1)
        step += 1
        # Count on the shorter side of the guess.
        if guess - lo <= hi - guess:
            at_guess = before_lo + data.count(b"\n", lo, guess)
        else:
            at_guess = before_hi - data.count(b"\n", guess, hi)
        if at_guess >= n:
            hi, before_hi = guess, at_guess
        else:
            lo, before_lo = guess, at_guess
    pos = lo - 1
    for _ in range(n - before_lo):
        pos = data.find(b"\n", pos + 1, hi)
    return pos


def cut_lines(block: LineBlock, n: int) -> tuple[LineBlock, LineBlock]:
    """Split ``block`` after its ``n``-th line: the first part holds ``n`` lines, the second the rest.

    ``0 <= n <= block.count``; either part may be empty (``count=0``). Positions stay exact: the
    first part ends where the second starts. Costs a few ``bytes.count`` passes over the block, not
    a Python step per line, so cutting 10,000 lines off a 1 MiB block takes microseconds.
    """
    if not 0 <= n <= block.count:
        raise ValueError(f"cut_lines: n must be between 0 and block.count={block.count}, got {n}")
    data = block.data
    if n == 0:
        return LineBlock(b"", 0, block.start, block.start), block
    if n == block.count:
        return block, LineBlock(b"", 0, block.end, block.end)
    # n < count, so the n-th line is not the last one and ends with a newline.
    newlines = block.count if data.endswith(b"\n") else block.count - 1
    cut = _nth_newline(data, n, 0, len(data), 0, newlines) + 1
    at = block.start + cut
    return (
        LineBlock(data[:cut], n, block.start, at),
        LineBlock(data[cut:], block.count - n, at, block.end),
    )


def cut_parts(
    pending: LineBlock | None, head: bytes, data: bytes, end: int, start: int, n: int, count: int
) -> tuple[list[LineBlock], LineBlock | None]:
    """Cut blocks of exactly ``n`` lines off ``pending`` followed by the lines ``head + data[:end]``.

    ``head + data[:end]`` holds ``count`` lines starting at byte ``start`` (as a reader's
    :meth:`LineSplitter.feed_parts` returns them: ``head`` is the partial line carried from the
    block before); ``pending`` (fewer than ``n`` lines, or ``None``) ends at ``start``. Returns the
    full blocks and the rest (fewer than ``n`` lines, ``None`` when nothing is left). The parts are
    never joined as a whole: each block is sliced from ``data`` or, for the first one, joined from
    ``pending``, ``head`` and the front of ``data``, so each byte is copied once (the rest's bytes
    once more when a later part completes it).
    """
    have = 0 if pending is None else pending.count
    if not 0 <= have < n or count < 1:
        raise ValueError(f"cut_parts: pending must hold fewer than n={n} lines and count must be >= 1")
    base = start + len(head)  # the byte position of data[0]
    times = (have + count) // n
    if times == 0:
        joined = b"".join((pending.data if pending else b"", head, memoryview(data)[:end]))
        return [], LineBlock(joined, have + count, base + end - len(joined), base + end)
    newlines = count if data[end - 1] == 10 else count - 1  # a last line without newline at the end
    blocks: list[LineBlock] = []
    lo = 0
    for k in range(1, times + 1):
        lines = k * n - have  # lines of this part up to the k-th cut
        if lines == count:
            cut = end
        else:
            cut = _nth_newline(data, lines, lo, end, lines - n if k > 1 else 0, newlines) + 1
        if k == 1:
            piece = b"".join((pending.data if pending else b"", head, memoryview(data)[:cut]))
            blocks.append(LineBlock(piece, n, base + cut - len(piece), base + cut))
        else:
            blocks.append(LineBlock(data[lo:cut], n, base + lo, base + cut))
        lo = cut
    left = have + count - times * n
    rest = LineBlock(data[lo:end], left, base + lo, base + end) if left else None
    return blocks, rest


def find_long_line(data: bytes, limit: int, carried: int = 0) -> int | None:
    """Offset in ``data`` where the first line longer than ``limit`` bytes starts, or ``None``.

    A line's length excludes its ``\\n``; a last piece without a newline counts as a line (a partial
    line is too long as soon as it holds more than ``limit`` bytes, whatever follows). ``carried``
    bytes of the first line came before ``data``: when that line is the long one, the result is
    ``-carried``. Scans in steps of about ``limit`` bytes with ``rfind``, not line by line.
    """
    size = len(data)
    if carried + size <= limit:
        return None
    pos = 0
    if carried:
        first = data.find(b"\n", 0, max(limit - carried + 1, 0))
        if first == -1:
            return -carried
        pos = first + 1
    while size - pos > limit:
        last = data.rfind(b"\n", pos, pos + limit + 1)
        if last == -1:
            return pos
        # Every line starting in [pos, last] ends at or before ``last``: all within the limit.
        pos = last + 1
    return None


class LineSplitter:
    """Turns a stream of raw bytes into blocks of complete lines (pure, no I/O).

    ``feed(data)`` returns the bytes of the lines completed by ``data`` (or ``None``) and keeps the
    partial last line; ``finish()`` returns that partial line (the end of a file or connection).
    After either, ``position`` is the offset just after the returned bytes, so they start at
    ``position - len(returned)``. A line longer than ``max_line_length`` bytes raises
    :class:`LineTooLong` naming ``where`` and the offset where the line starts, but only after the
    lines before it were returned: ``feed`` returns those first and raises on the next call (or on
    ``raise_pending()``). ``pending`` is the number of bytes held back.
    """

    def __init__(self, where: str, start: int, max_line_length: int) -> None:
        self.where = where
        self.position = start
        self.max_line_length = max_line_length
        self._buf = b""
        self._error: LineTooLong | None = None

    @property
    def pending(self) -> int:
        """Bytes of the partial last line held back."""
        return len(self._buf)

    def raise_pending(self) -> None:
        """Raise the :class:`LineTooLong` found by the last ``feed``, if any."""
        if self._error is not None:
            raise self._error

    def feed(self, data: bytes) -> bytes | None:
        """Add ``data``; return the complete lines it finished, or ``None`` when there are none."""
        parts = self.feed_parts(data)
        if parts is None:
            return None
        head, end = parts
        # One copy: the carried partial line joined with the completed lines of ``data``.
        return b"".join((head, memoryview(data)[:end])) if head else data[:end]

    def feed_parts(self, data: bytes) -> tuple[bytes, int] | None:
        """Like :meth:`feed`, without joining: the complete lines are ``head + data[:end]``.

        Returns ``(head, end)`` (``head`` is the partial line carried from before, often empty) or
        ``None``. Nothing is copied but a partial line, so a reader that splits the lines itself
        (:func:`decode_parts`) touches each byte of ``data`` once.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        last = data.rfind(b"\n")
        bad = find_long_line(data, self.max_line_length, len(buf))
        if bad is not None:
            self._error = LineTooLong(self.where, self.position + len(buf) + bad, self.max_line_length)
            self._buf = b""
            # Deliver the complete lines before the over-long one, then raise on the next call.
            last = data.rfind(b"\n", 0, max(bad, 0))
            if last == -1:
                raise self._error
        elif last == -1:
            self._buf = buf + data
            return None
        else:
            self._buf = data[last + 1 :]
        self.position += len(buf) + last + 1
        return buf, last + 1

    def finish(self) -> bytes | None:
        """Return the held-back partial line as the last record (end of the file or connection)."""
        if self._error is not None:
            raise self._error
        data = self._buf
        if not data:
            return None
        self._buf = b""
        self.position += len(data)
        return data

    def reset(self, position: int) -> None:
        """Start over at ``position`` (after truncation or rotation) with nothing held back."""
        self._buf = b""
        self.position = position
