"""Opening a file source where its reading starts: a byte offset of the file at its path, or the
file a resumed position identified, wherever that file is now.

A resumed source never looks its path up again to find the file it read before: the position
names the file by identity (:class:`~microbatch.checkpoints.identity.FilePosition`), and the file is
recognised on the open descriptor itself, so a rotation between the resume's checks and the
open is harmless. The functions that open block; the waiting one runs them in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import IO

import anyio

from .._exceptions import CheckpointMismatch
from ..checkpoints.identity import FilePosition, open_identified

__all__ = ["open_at", "open_identified_at", "wait_and_open"]

logger = logging.getLogger("microbatch.sources")


def open_identified_at(path: str, position: FilePosition, *, follow: bool) -> IO[bytes]:
    """The file ``position`` names, open at its offset; ``CheckpointMismatch`` when it is gone, or
    when it was rotated and the source does not follow (a copy counts only when it follows)."""
    found = open_identified(path, position.file, position, copies=follow)
    if found is None:
        raise CheckpointMismatch(
            f"{path}: the file read up to byte offset {position.offset} (inode {position.file.inode}) "
            f"is gone: neither the path nor a file beside it holds it. Pass fresh=True (--fresh) to "
            f"start over"
        )
    f, name = found
    if not follow and name != path:
        f.close()
        raise CheckpointMismatch(
            f"{path} was rotated to {name}: only a followed source (follow=True) continues in the "
            f"new file. Pass fresh=True (--fresh) to start over"
        )
    f.seek(position.offset)
    return f


def open_at(
    path: str, start: int, *, follow: bool, position: FilePosition | None = None
) -> tuple[IO[bytes], int]:
    """Open the file to read from ``start`` (or from ``position``); returns it and its start offset.

    ``start`` must begin a line (``ValueError`` naming the byte otherwise). Past the end of the
    file: ``ValueError``, or with ``follow`` (the file was truncated since) byte 0.
    """
    if position is not None:
        return open_identified_at(path, position, follow=follow), position.offset
    f = open(path, "rb", buffering=0)  # closed by the reading or the trail
    try:
        size = os.fstat(f.fileno()).st_size
        if start > size:
            if not follow:
                raise ValueError(
                    f"{path}: start={start} is past the end of the file ({size} bytes); "
                    f"was the file replaced since that offset was recorded?"
                )
            start = 0  # truncated since the offset was recorded: read it all, like tail -F
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                raise ValueError(
                    f"{path}: start={start} is not the beginning of a line (byte {start - 1} "
                    f"is not a newline); pass the end offset of a block or record read before"
                )
        return f, start
    except BaseException:
        f.close()
        raise


async def wait_and_open(
    path: str,
    start: int,
    *,
    follow: bool,
    position: FilePosition | None,
    wait_for_file: float | None,
    poll_interval: float,
) -> tuple[IO[bytes], int]:
    """:func:`open_at` in a worker thread; a followed file that does not exist yet (and is not
    resumed) is looked for every ``poll_interval``, at most ``wait_for_file`` seconds (None: for ever)."""
    if not follow or position is not None:
        return await anyio.to_thread.run_sync(lambda: open_at(path, start, follow=follow, position=position))
    waited = anyio.current_time()
    logged = False
    while True:
        try:
            return await anyio.to_thread.run_sync(lambda: open_at(path, start, follow=True))
        except FileNotFoundError:  # noqa: PERF203 - once per poll of a missing file
            if not logged:
                logger.info("waiting for %s to exist", path)
                logged = True
            if wait_for_file is not None and anyio.current_time() - waited >= wait_for_file:
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"{path} did not appear within wait_for_file={wait_for_file:g} s "
                    f"(no such file or directory)",
                    path,
                ) from None
            await anyio.sleep(poll_interval)
