"""What ``--input`` names: a file, standard input (``-``), a TCP server (``tcp://HOST:PORT``), a
NATS JetStream stream (``nats://HOST:PORT/STREAM[/SUBJECT]``) or many files (a quoted glob)."""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codes import UsageError


@dataclass(frozen=True)
class _Input:
    kind: str  # "file", "stdin", "tcp", "nats" or "files"
    path: str = ""  # a file's path; the glob pattern of "files"
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""  # "nats": the server's URL, the stream and the subject (or "")
    stream: str = ""
    subject: str = ""


#: Hosts that make a TCP server listen on every interface.
_EVERY_INTERFACE = ("0", "0.0.0.0", "::", "*")


def _parse_input(text: str, follow: bool) -> _Input:
    if text == "-":
        if follow:
            raise UsageError("--follow needs a file: standard input ('-') is read until it ends")
        from .._exceptions import SourceError
        from ..sources.stdin import stdin_fd

        try:
            stdin_fd()
        except SourceError:
            raise UsageError(
                "--input -: standard input is closed; give the input on it ('< file' or a pipe) "
                "or name a file"
            ) from None
        return _Input("stdin")
    if text.startswith("tcp://"):
        if follow:
            raise UsageError("--follow needs a file: a TCP input (tcp://) runs until interrupted")
        hostport = text[len("tcp://") :]
        host, sep, port_text = hostport.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise UsageError(
                f"--input {text!r}: expected tcp://HOST:PORT with PORT 0..65535, e.g. tcp://127.0.0.1:9000"
            )
        if host in _EVERY_INTERFACE:
            from .logs import log

            log.warning(
                "--input %s listens on every network interface: anyone who can reach this machine "
                "can send records; use tcp://127.0.0.1:%s to accept local clients only",
                text,
                port_text,
            )
        return _Input("tcp", host=host, port=int(port_text))
    if text.startswith("nats://"):
        return _parse_nats(text)
    if "://" in text:
        raise UsageError(
            f"--input {text!r}: unknown scheme; use a file path, a quoted glob, '-', tcp://HOST:PORT "
            f"or nats://HOST:PORT/STREAM"
        )
    if glob.has_magic(text) and not os.path.exists(text):
        if not follow and not glob.glob(text):
            raise UsageError(f"--input {text!r}: no file matches (use --follow to wait for files)")
        return _Input("files", path=text)
    path = Path(text)
    if path.is_dir():
        raise UsageError(f"--input {text!r} is a folder, not a file")
    if not path.exists() and not follow:
        raise UsageError(f"--input {text!r}: no such file (use --follow to wait for a file that grows)")
    return _Input("file", path=text)


def _parse_nats(text: str) -> _Input:
    """``nats://HOST:PORT/STREAM[/SUBJECT]``: the server's URL, the stream and the subject."""
    hostport, _, rest = text[len("nats://") :].partition("/")
    stream, _, subject = rest.partition("/")
    if not hostport or not stream or any(c in stream for c in " .*>"):
        raise UsageError(
            f"--input {text!r}: expected nats://HOST:PORT/STREAM or nats://HOST:PORT/STREAM/SUBJECT, "
            f"e.g. nats://127.0.0.1:4222/EVENTS"
        )
    return _Input("nats", url=f"nats://{hostport}", stream=stream, subject=subject)


def _make_source(
    spec: _Input,
    encoding: str,
    follow: bool,
    *,
    poll_interval: float | None = None,
    stop_when_idle: float | None = None,
) -> Any:
    from ..sources import nats_stream, read_files, read_lines, stdin_lines, tcp_lines

    if spec.kind == "nats":
        # A stream is followed (--follow or not); --stop-when-idle ends the run once caught up.
        subject = spec.subject or None
        idle = stop_when_idle
        return nats_stream(spec.url, spec.stream, subject=subject, encoding=encoding, stop_when_idle=idle)
    if spec.kind == "files":
        from ..sources.many import DEFAULT_POLL_INTERVAL

        poll = DEFAULT_POLL_INTERVAL if poll_interval is None else poll_interval
        return read_files(
            spec.path, follow=follow, encoding=encoding, stop_when_idle=stop_when_idle, poll_interval=poll
        )
    if spec.kind == "file":
        if poll_interval is not None:
            return read_lines(spec.path, encoding=encoding, follow=follow, poll_interval=poll_interval)
        return read_lines(spec.path, encoding=encoding, follow=follow)
    if spec.kind == "tcp":
        return tcp_lines(spec.port, host=spec.host)
    return stdin_lines(encoding=encoding)


def _total_size(spec: _Input, follow: bool) -> int | None:
    if spec.kind != "file" or follow or is_fifo(spec):
        return None
    try:
        return os.path.getsize(spec.path)
    except OSError:
        return None


def is_fifo(spec: _Input) -> bool:
    """Whether ``spec`` names a named pipe (FIFO), which has no size and may have no writer yet."""
    try:
        return spec.kind == "file" and stat.S_ISFIFO(os.stat(spec.path).st_mode)
    except OSError:
        return False


def fifo_source(path: str, encoding: str) -> tuple[Any, int]:
    """The lines of the FIFO at ``path``, read through a non-blocking read end; and that end's fd.

    Opening a FIFO for reading the usual way blocks until a writer opens it, in a thread no signal
    can stop. A non-blocking read end opens at once, and the reader awaits data with an ordinary
    (cancellable) wait, so SIGINT and SIGTERM stop a run whose FIFO never gets a writer. The
    input ends when the last writer closes it. The caller closes the fd after the run.
    """
    from ..sources import stdin_lines

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    source = stdin_lines(fd=fd, encoding=encoding)
    source.where = path  # errors name the FIFO, not <stdin>
    return source, fd


async def wait_for_file(path: str, timeout: float | None, poll_interval: float) -> None:
    """Wait until ``path`` exists, checking every ``poll_interval`` seconds, for a file to follow.

    ``timeout`` None waits as long as the run lasts (a signal stops it like the run). Raises
    ``FileNotFoundError`` naming the path and the wait when it did not appear within ``timeout``.
    """
    import logging

    import anyio

    logging.getLogger("microbatch.cli").info("waiting for %s to appear (--follow)", path)
    with anyio.move_on_after(timeout):
        # Polled like a followed file is: no portable event says that a path appeared.
        while True:
            if await anyio.Path(path).exists():
                return
            await anyio.sleep(poll_interval)
    raise FileNotFoundError(f"--input {path!r} did not appear within {timeout:g} s (--wait-for-file)")
