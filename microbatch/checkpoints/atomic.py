"""The one way checkpoint data reaches the disk: a temporary file, fsync, rename, fsync of the folder.

Every writer of checkpoint data uses :func:`write_atomic`: the folder store's checkpoint files and
the keyed state's shard files. A crash at any step leaves either the old file or the new one under
the final name, never a torn one; a temporary file a crash left behind keeps its ``prefix`` and the
``.tmp`` suffix, so its owner can find and remove it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "folder_identity", "fsync_dir", "make_folder", "remove_unnamed", "write_atomic"]

#: The suffix of every temporary file :func:`write_atomic` makes.
TEMP_SUFFIX = ".tmp"


def make_folder(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700, whatever the umask (they hold the
    aggregator's state and failed records); a folder that exists is left as it is."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        if path.parent == path:
            raise
        make_folder(path.parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return


def write_atomic(folder: Path, name: str, data: bytes, *, prefix: str, fsync: bool = True) -> None:
    """Write ``data`` as ``folder/name`` atomically, mode 0600; the folder is created (0700) if missing.

    The data goes to a temporary file made by ``tempfile.mkstemp`` in ``folder`` (``prefix``,
    ``.tmp``), is flushed and ``fsync``ed, then ``os.replace``d onto ``name``. ``fsync_dir`` is
    left to the caller, so that several files can share one. Raises the ``OSError`` of the step
    that failed, after removing the temporary file.
    """
    make_folder(folder)
    fd: int | None = None
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:  # pragma: no cover - os.write raises rather than return 0
                raise OSError(errno.EIO, "write returned 0")
            view = view[written:]
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, folder / name)
    except BaseException:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(device, inode)`` of the folder ``path`` (None: it does not exist): a folder deleted or
    replaced since it was last written has another one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def remove_unnamed(
    folder: Path, keep: set[str], *, prefix: str, suffixes: tuple[str, ...], temp_prefix: str
) -> list[str]:
    """Remove the files of ``folder`` named ``prefix...suffix`` (one of ``suffixes``) that are not
    in ``keep``, and the temporary files ``write_atomic`` left (``temp_prefix``); the names removed,
    sorted. Nothing when the folder is gone."""
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for file in folder.iterdir():
        name = file.name
        ours = name.startswith(prefix) and name.endswith(suffixes)
        temporary = name.startswith(temp_prefix) and name.endswith(TEMP_SUFFIX)
        if (ours or temporary) and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
            removed.append(name)
    return sorted(removed)
