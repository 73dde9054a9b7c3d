"""Large answers of a worker process, unpickled while they are read from its pipe.

An answer of ``STREAM_AT`` bytes or more is not gathered in memory before it is unpickled: a thread
runs ``pickle.load`` on a file-like view of the frame, which reads the pipe as the unpickler asks
for bytes. ``pickle`` reads a large ``bytes`` or ``bytearray`` straight into the object it builds
(``readinto``), and containers of smaller objects piece by piece, so the pipeline process holds the
result being built and not, besides, its pickled bytes: about one result's size per call in flight.
A single huge ``str`` passes through one buffer of its UTF-8 size first.

The thread reads exactly the frame (never the next one), waits for the pipe with ``poll`` and stops
when the caller is cancelled (a wake-up pipe). A result that does not unpickle here is read to the
frame's end anyway, so the pipe stays in step and the worker stays; the error names ``fn``.
"""

from __future__ import annotations

import os
import pickle
import select
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from . import remote
from .pipes import _Pipes

__all__ = ["STREAM_AT", "receive_streamed"]

# Answers at least this large are unpickled from the pipe as they are read.
STREAM_AT = 1 << 20
# How much a read for pickle's small requests, or to skip the rest of a frame, takes at once.
_CHUNK = 1 << 20


class _Stopped(Exception):
    """The caller was cancelled: the thread stops reading."""


class FrameReader:
    """The body of one frame, still in the pipe, as a file for ``pickle.load`` (in a thread)."""

    def __init__(self, fd: int, head: bytes, size: int, wake_fd: int) -> None:
        self._fd = fd
        self._head = memoryview(head)  # the start of the body, read with the header already
        self.left = size  # bytes of the body not consumed yet (``head`` included)
        self.ended = False  # end of file inside the frame: the worker died
        self.stopped = False  # woken: the caller was cancelled
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(wake_fd, select.POLLIN)
        self._wake_fd = wake_fd

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the frame (less only at its end): what ``pickle`` calls for data."""
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.left)
        got = 0
        if self._head:
            got = min(want, len(self._head))
            view[:got] = self._head[:got]
            self._head = self._head[got:]
        while got < want:
            try:
                n = os.readv(self._fd, [view[got:want]])
            except BlockingIOError:
                self._wait()
                continue
            if n == 0:
                self.ended = True
                raise EOFError("the worker's pipe ended inside an answer")
            got += n
        self.left -= got
        return got

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.left:
            size = self.left
        buffer = bytearray(size)
        got = self.readinto(buffer)
        return bytes(buffer) if got == size else bytes(buffer[:got])

    def readline(self) -> bytes:
        line = bytearray()
        while self.left and not line.endswith(b"\n"):
            line += self.read(1)
        return bytes(line)

    def skip_rest(self) -> None:
        """Read and drop what is left of the frame, so that the next frame comes next."""
        chunk = bytearray(min(self.left, _CHUNK))
        while self.left:
            self.readinto(memoryview(chunk)[: min(self.left, len(chunk))])

    def _wait(self) -> None:
        for fd, _ in self._poll.poll():
            if fd == self._wake_fd:
                self.stopped = True
                raise _Stopped


def _load(reader: FrameReader, kind: int, fn: object) -> tuple[Any, ...] | BaseException:
    """The outcome in the frame, or the error that says it cannot be read; the frame read whole."""
    try:
        outcome: tuple[Any, ...] | BaseException = remote.decode(kind, reader, fn, loads=pickle.load)
    except Exception as exc:  # decode wraps what the reader raised too
        if reader.stopped:
            raise _Stopped from exc
        if reader.ended:
            raise EOFError from exc
        outcome = exc
    reader.skip_rest()
    return outcome


async def receive_streamed(
    pipes: _Pipes, kind: int, size: int, fn: object
) -> tuple[Any, ...] | BaseException:
    """Read and unpickle a ``size``-byte answer frame in a thread: its outcome (see ``remote``),
    or the ``ExecutorError`` saying it cannot be unpickled here.

    ``anyio.EndOfStream`` when the pipe ends inside the frame (the worker died). When the caller
    is cancelled, the thread stops and the frame is left half read: the worker must be killed.
    """
    wake_r, wake_w = os.pipe()
    head = pipes.take_buffered(size)
    reader = FrameReader(pipes.lend(), head, size, wake_r)
    del head
    failed: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def wake_on_cancel() -> None:
                try:
                    await anyio.sleep_forever()
                finally:
                    os.write(wake_w, b"x")

            tg.start_soon(wake_on_cancel)
            try:
                # Not abandoned on cancellation: the thread is woken and stops at once.
                outcome = await anyio.to_thread.run_sync(_load, reader, kind, fn)
            except (_Stopped, EOFError) as exc:
                failed = exc
            finally:
                tg.cancel_scope.cancel()
    finally:
        pipes.give_back()
        os.close(wake_r)
        os.close(wake_w)
    if isinstance(failed, EOFError):
        raise anyio.EndOfStream
    if failed is not None:  # stopped: the cancellation that stopped it comes now
        await anyio.lowlevel.checkpoint()
        raise anyio.BrokenResourceError  # pragma: no cover - always cancelled
    return outcome
