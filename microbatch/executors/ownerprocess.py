"""One shard owner process as the pipeline sees it: started, its control connection, stopped.

The owner is ``python .../ownerproc.py PARENT_PID SOCKET_PATH INDEX KEEP`` (see
:mod:`microbatch.executors.ownerproc`), started with ``subprocess.Popen`` so that it can be started
again from synchronous code (the fold stage's FOLD, the checkpoint thread's barrier) when it died.
Its control connection is made at the first request, waiting for the owner to listen.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from typing import Any

from .._core import ownerwire as wire
from .._exceptions import ExecutorUnavailable
from .spawn import exit_description

__all__ = ["START_TIMEOUT", "OwnerFailed", "OwnerProcess"]

_SCRIPT = os.path.join(os.path.dirname(__file__), "ownerproc.py")
#: Seconds an owner process has to start listening.
START_TIMEOUT = 60.0
#: Seconds a stopped owner has to exit after its control connection closed, before SIGKILL.
EXIT_GRACE = 2.0


class OwnerFailed(Exception):
    """An owner answered a request with an error (a checkpoint it could not write or load)."""


class OwnerProcess:
    """A started owner process and, once made, its control connection."""

    def __init__(self, index: int, folder: str, *, keep_parts: bool) -> None:
        self.index = index
        self.path = os.path.join(folder, f"owner-{index}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # the socket of an owner that died
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, _SCRIPT, str(os.getpid()), self.path, str(index), "1" if keep_parts else "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
        )
        self.pid = self.process.pid
        self._control: socket.socket | None = None

    def control(self) -> socket.socket:
        """The control connection, made at the first use: ``ConnectionError`` when the owner exited
        first, ``ExecutorUnavailable`` when it does not listen within ``START_TIMEOUT`` seconds."""
        if self._control is None:
            try:
                self._control = wire.connect(
                    self.path, wait=START_TIMEOUT, alive=lambda: self.process.poll() is None
                )
            except OSError as exc:
                if self.process.poll() is not None:
                    raise ConnectionError(f"it exited before it listened: {exc}") from None
                raise ExecutorUnavailable(
                    f"shard owner {self.index} (process {self.pid}) did not listen within "
                    f"{START_TIMEOUT} s ({self.exit()}: {exc}); its stderr says why"
                ) from None
            self._control.sendall(wire.frame(wire.CONTROL, 0))
        return self._control

    def send(self, data: bytes) -> None:
        """Send a frame; ``OSError`` when the owner is gone."""
        self.control().sendall(data)

    def answer(self, *, lists: bool = False, raw: bool = False) -> Any:
        """The next answer: a value (``raw``: its bytes, undecoded), or ``OwnerFailed``;
        ``EOFError``/``OSError`` when the owner is gone."""
        try:
            kind, _, data = wire.receive_frame(self.control())
        except ConnectionError as exc:
            raise EOFError(str(exc)) from None
        if kind == wire.FAILED:
            return OwnerFailed(data.decode(errors="replace"))
        if raw:
            return data
        return wire.unpack_json(data) if lists else wire.unpack(data)

    def exit(self) -> str:
        """How the process ended (``exit status unknown`` while it runs)."""
        return exit_description(self.process.poll())

    def kill(self) -> None:
        """SIGKILL (if it still runs) and close the connection; reaped by ``stop``."""
        if self._control is not None:
            self._control.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def stop(self) -> None:
        """Close the connection (the owner exits on it), wait ``EXIT_GRACE`` s, then kill; reap it.
        Blocking: call it in a thread."""
        if self._control is None:
            self.kill()  # never connected: it would wait for its control connection
        else:
            self._control.close()
        try:
            self.process.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
