"""Fingerprints of the bytes of a file before a checkpointed offset, to tell whether they changed since.

A checkpoint of a file source records digests of byte ranges of the file's prefix ``[0, offset)``
(:func:`prefix_ranges`); a resume recomputes them over the file it found (:func:`first_difference`)
and refuses to continue when one differs, naming that range. Two settings:

- ``"full"`` (the default): the ranges cover the whole prefix, at most ``MAX_RANGES`` of them, so
  any change of a byte before the offset is found, and the range named is at most 1/32 of the
  prefix (and at least ``PIECE`` bytes). A resume reads the whole prefix once: about 0.1 to 0.4 s per
  GiB from the page cache on 2 cores, in parallel threads. While a run goes on, each checkpoint
  hashes only the bytes read since the one before (:class:`PrefixHasher` keeps the digests of the
  complete pieces), so checkpoints of a growing file stay cheap.
- ``"sampled"``: at most ``SAMPLES`` blocks of ``SAMPLE`` bytes spread evenly over the prefix (the
  first one at byte 0), plus the last block before the offset; a resume reads about 1 MiB
  whatever the file size, and a checkpoint about 64 KiB.
  Its blind spots: a change that touches none of those blocks, such as an edit of a few bytes in
  the middle of a large file that keeps its length, is not seen.

A range's digest is ``xxh3_128`` of the concatenated ``xxh3_128`` digests of its ``PIECE``-byte
pieces, counted from the range's start (the last piece may be shorter): pieces are hashed in
parallel and cached, and a range is a single piece in ``"sampled"`` mode. The functions block
(``pread``); call them from a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import xxhash

__all__ = [
    "MAX_RANGES",
    "PIECE",
    "SAMPLE",
    "SAMPLES",
    "PrefixHasher",
    "Range",
    "Verify",
    "check_verify",
    "first_difference",
    "prefix_ranges",
]

#: Bytes hashed as one piece (the smallest range ``"full"`` names).
PIECE = 4 << 20
#: The most ranges a ``"full"`` fingerprint holds.
MAX_RANGES = 32
#: Bytes in one sampled block (``"sampled"``).
SAMPLE = 64 << 10
#: Sampled blocks spread over the prefix, besides its first and last block.
SAMPLES = 16
#: Threads that hash pieces in parallel when a resume verifies a prefix.
THREADS = 2

Verify = Literal["full", "sampled"]
#: ``(start, end, digest)``: the digest (32 hex digits) of the bytes ``[start, end)``.
Range = tuple[int, int, str]


def check_verify(verify: object) -> Verify:
    """``verify`` itself when it is ``"full"`` or ``"sampled"``, else ``ValueError`` naming it."""
    if verify == "full" or verify == "sampled":
        return verify
    raise ValueError(f"verify must be 'full' or 'sampled', got {verify!r}")


def _piece(fd: int, start: int, end: int) -> bytes:
    data = os.pread(fd, end - start, start)
    if len(data) < end - start:
        raise _Short(start + len(data))
    return xxhash.xxh3_128_digest(data)


class _Short(Exception):
    """The file ended at ``size``, before the end of a range (it was truncated)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _pieces(start: int, end: int) -> list[tuple[int, int]]:
    return [(at, min(at + PIECE, end)) for at in range(start, end, PIECE)]


def _combine(digests: Iterable[bytes]) -> str:
    return xxhash.xxh3_128_hexdigest(b"".join(digests))


def _full_bounds(offset: int) -> list[tuple[int, int]]:
    pieces = -(-offset // PIECE)
    per = 1
    while -(-pieces // per) > MAX_RANGES:
        per *= 2
    size = per * PIECE
    return [(at, min(at + size, offset)) for at in range(0, offset, size)]


def _sample_bounds(offset: int) -> list[tuple[int, int]]:
    """Blocks at every multiple of a power-of-two stride (the smallest giving at most ``SAMPLES``
    blocks), then the last block before the offset: the strided ones stay put as the file grows,
    so their digests are kept between checkpoints."""
    stride = SAMPLE
    while -(-offset // stride) > SAMPLES:
        stride *= 2
    bounds = [(at, min(at + SAMPLE, offset)) for at in range(0, offset, stride)]
    last = (max(0, offset - SAMPLE), offset)
    if bounds and last[0] < bounds[-1][1]:
        last = (bounds.pop()[0], offset)  # overlapping: one block to the offset
    if last[0] < last[1]:
        bounds.append(last)
    return bounds


class PrefixHasher:
    """What one file's fingerprint needs kept between checkpoints, so that each hashes only new bytes:
    the digests of the complete pieces, the running hash of the piece in progress (``"full"``),
    and the sampled blocks' digests (``"sampled"``).

    A run keeps one per file it reads; a checkpoint of an offset before the bytes hashed so far
    (a file read again from an earlier point), or of another file, starts over.
    """

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.pieces: list[bytes] = []
        self.partial = xxhash.xxh3_128()
        self.done = 0  # bytes hashed into the pieces and the partial piece
        self.samples: dict[tuple[int, int], bytes] = {}

    def _start_over(self, fd: int, offset: int) -> None:
        st = os.fstat(fd)
        if self.key != (st.st_dev, st.st_ino) or self.done > offset:
            self.key, self.pieces, self.partial, self.done = (st.st_dev, st.st_ino), [], xxhash.xxh3_128(), 0
            self.samples = {}

    def ranges(self, fd: int, offset: int, verify: Verify) -> tuple[Range, ...]:
        """The fingerprint of the prefix ``[0, offset)`` of the open file ``fd`` (``verify`` mode)."""
        self._start_over(fd, offset)
        if verify == "sampled":
            found = []
            for start, end in _sample_bounds(offset):
                digest = self.samples.get((start, end))
                if digest is None:
                    digest = _piece(fd, start, end)
                    if end - start == SAMPLE and end < offset:  # a strided block: it stays
                        self.samples[(start, end)] = digest
                found.append((start, end, _combine([digest])))
            return tuple(found)
        while self.done < offset:
            end = min((len(self.pieces) + 1) * PIECE, offset)
            data = os.pread(fd, end - self.done, self.done)
            if len(data) < end - self.done:
                raise ValueError(f"the file shrank below byte {offset} while its fingerprint was taken")
            self.partial.update(data)
            self.done = end
            if end % PIECE == 0:
                self.pieces.append(self.partial.digest())
                self.partial = xxhash.xxh3_128()
        every = [*self.pieces, self.partial.digest()] if offset % PIECE else self.pieces
        return tuple(
            (start, end, _combine(every[start // PIECE : -(-end // PIECE)]))
            for start, end in _full_bounds(offset)
        )


def prefix_ranges(fd: int, offset: int, verify: Verify) -> tuple[Range, ...]:
    """The fingerprint of ``[0, offset)`` of ``fd`` with nothing cached (see :class:`PrefixHasher`)."""
    return PrefixHasher().ranges(fd, offset, verify)


def first_difference(fd: int, ranges: Sequence[Range]) -> tuple[int, int] | None:
    """The first range of ``ranges`` whose bytes in ``fd`` no longer have its digest, or ``None``.

    Pieces are hashed in ``THREADS`` threads (``pread`` and the hash release the GIL). A file now
    shorter than a range differs in that range.
    """
    jobs = [(i, s, e) for i, (start, end, _) in enumerate(ranges) for s, e in _pieces(start, end)]
    digests: list[list[bytes]] = [[] for _ in ranges]

    def work(job: tuple[int, int, int]) -> tuple[int, bytes | None]:
        i, s, e = job
        try:
            return i, _piece(fd, s, e)
        except _Short:
            return i, None

    short: set[int] = set()
    if len(jobs) > 1:
        with ThreadPoolExecutor(THREADS) as pool:
            done = list(pool.map(work, jobs))
    else:
        done = [work(job) for job in jobs]
    for i, digest in done:
        if digest is None:
            short.add(i)
        else:
            digests[i].append(digest)
    for i, (start, end, expected) in enumerate(ranges):
        if i in short or _combine(digests[i]) != expected:
            return start, end
    return None
