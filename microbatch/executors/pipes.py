"""The parent's ends of a worker process's pipes, read and written without stream objects."""

from __future__ import annotations

import os

import anyio

__all__ = ["PIPE_ERRORS", "_Pipes"]

# What reading or writing a worker's pipes raises when the worker died or the executor closed them.
PIPE_ERRORS = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


class _Pipes:
    """The parent's ends of a worker's two pipes, as non-blocking file descriptors.

    Reads and writes go straight to ``os.read``/``os.write`` and wait with ``anyio.wait_readable``/
    ``wait_writable`` only when the pipe is empty or full: no stream, transport or protocol
    objects in between (on asyncio those cost more than the whole round trip to the worker). One
    task reads and one task writes at a time. ``close()`` wakes a waiting task with
    ``ClosedResourceError``; a descriptor is never used after it was closed, so a number the OS
    hands out again cannot be read by mistake.

    The read end can be lent to a thread (``lend()``, ``give_back()``), which reads a large frame
    as it is unpickled (:mod:`microbatch.executors.streaming`); ``close()`` meanwhile leaves the
    read descriptor open until it is given back.
    """

    __slots__ = ("read_fd", "write_fd", "_buffer", "closed", "lent")

    def __init__(self, read_fd: int, write_fd: int) -> None:
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buffer = bytearray()
        self.closed = False
        self.lent = False

    def _check(self) -> None:
        if self.closed:
            raise anyio.ClosedResourceError

    async def send(self, buffers: list[bytes]) -> None:
        """Write ``buffers`` one after the other; the common case is a single ``writev`` call."""
        self._check()
        total = sum(map(len, buffers))
        try:
            written = os.writev(self.write_fd, buffers)
        except BlockingIOError:
            written = 0
        if written == total:
            return
        view = memoryview(b"".join(buffers))[written:]
        while view:
            self._check()
            try:
                written = os.write(self.write_fd, view)
            except BlockingIOError:
                await anyio.wait_writable(self.write_fd)
            else:
                view = view[written:]

    async def receive_exactly(self, size: int) -> bytes:
        buffer = self._buffer
        while len(buffer) < size:
            self._check()
            try:
                # At least 64 KiB (a small frame and its header come in one call), at most what
                # a widened pipe holds (a big frame does not allocate its whole size per call).
                chunk = os.read(self.read_fd, min(max(size - len(buffer), 1 << 16), 1 << 20))
            except BlockingIOError:
                await anyio.wait_readable(self.read_fd)
                continue
            if not chunk:
                raise anyio.EndOfStream
            buffer += chunk
        if len(buffer) == size:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(memoryview(buffer)[:size])  # one copy; the view is gone before the del
            del buffer[:size]
        return data

    def feed(self, data: bytes) -> None:
        """Add bytes read from the pipe elsewhere (without waiting) to what is received next."""
        self._buffer += data

    def take_frame(self, size: int) -> bytes | None:
        """The next ``size`` bytes if they were read already, else None (nothing taken)."""
        if len(self._buffer) < size:
            return None
        return self.take_buffered(size)

    def take_buffered(self, limit: int) -> bytes:
        """Up to ``limit`` bytes read from the pipe already and not yet received."""
        taken = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        return taken

    def lend(self) -> int:
        """The read descriptor, for a thread to read from until ``give_back()``."""
        self._check()
        assert not self.lent
        self.lent = True
        return self.read_fd

    def give_back(self) -> None:
        self.lent = False
        if self.closed:  # closed while lent: the read end was left open for the thread
            os.close(self.read_fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            anyio.notify_closing(self.write_fd)
            os.close(self.write_fd)
            if not self.lent:
                anyio.notify_closing(self.read_fd)
                os.close(self.read_fd)
