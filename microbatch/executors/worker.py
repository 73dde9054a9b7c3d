"""The worker process of ``ProcessExecutor``: runs one call at a time for its parent.

Started as ``python .../microbatch/executors/worker.py PARENT_PID [NICE]`` (running the file, not ``-m``,
keeps the package's ``__init__`` files and their imports out of the worker until something really needs
them). It imports only the standard library and its sibling ``remote.py`` (the one encoding of a call's
outcome, loaded by path under its package name); ``cloudpickle`` is imported by ``pickle`` itself when a
function pickled by value arrives.

Protocol: length-prefixed frames over the pipes the parent gave as stdin and stdout. A frame is a
17-byte header ``<BQQ`` (kind, token, payload length) followed by the payload.

    parent -> worker   INIT   pickled settings: the parent's ``sys.path``,  -> READY
                              whether to report the worker's RSS, the
                              largest answer to send (``max_result_bytes``)
                       FN     token, a function pickled with cloudpickle    -> LOADED
                       CALL   token of a function sent before, pickled arg  -> RESULT | RAISED | REMOTE_ERROR
    worker -> parent   LOADED        the function is unpickled (its module imported), or failed to be;
                                     the parent starts the call's time limit only then
                       RESULT | RAISED | REMOTE_ERROR
                                     the outcome of a call, encoded by ``remote.encode``: the
                                     pickled return value, ``(exception, formatted traceback)``, or
                                     ``(type name, message, formatted traceback)`` when the exception
                                     itself cannot make the round trip through pickle; the
                                     token is the worker's resident memory in bytes after the
                                     call, when INIT asked for it (0 otherwise)
                       TOO_LARGE     instead of an answer whose body is over ``max_result_bytes``:
                                     ``(size, kind)`` of the answer it refused to send, pickled

Run as ``worker.py PARENT_PID NICE fork-server``, the script is a fork server instead
(:func:`serve_forks`): on a Unix socket as fds 0 and 1, INIT (``sys.path``, modules to ``preload``)
-> READY, then ``FORK_FRAME``s: FORK (with the new worker's two pipe ends) -> FORKED (its pid) or
FORK_FAILED (an errno); EXITED (a worker's pid and exit code) as each ends; RELEASE (a pid the
parent has reaped: the server reaps it now). Each forked worker then speaks the protocol above.

Both sides keep the last ``FN_CACHE_SIZE`` functions by token, evicting the least recently used in
the same order, so the parent knows which functions a worker still holds without asking.

Safety measures taken at start-up:

- the protocol moves to private, non-inheritable file descriptors; fd 0 reads ``/dev/null`` and fd 1
  points at stderr, so a ``print`` in user code (or in a subprocess it starts) cannot corrupt a frame;
- the worker dies with its parent: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux, plus a daemon
  thread on every platform that checks ``os.getppid()`` every ``PARENT_POLL_INTERVAL`` seconds and
  calls ``os._exit`` when the parent is gone (this also works while user code loops forever, since
  the interpreter switches threads every few milliseconds);
- SIGINT and SIGTERM are caught and dropped, first thing: the worker leads a process group of its
  own, out of reach of a terminal's Ctrl-C, but systemd's stop (``KillMode=control-group``) still
  reaches every process; the parent, not the worker, decides what happens to a batch in flight, and
  kills its workers' groups with SIGKILL when it stops. A worker killed before it got that far is
  replaced by the parent (see ``spawn.start_worker``). Caught, not ignored: an ignored signal stays
  ignored in every program the worker starts, a caught one is back to its default after ``exec``;
  a process forked without ``exec`` (``os.fork``, multiprocessing) gets Python's defaults back;
- the descriptors the worker inherited beyond 0-2 are closed, the protocol's are close-on-exec,
  and a process forked without ``exec`` gets them pointed at ``/dev/null``: a process ``fn``
  started never holds the worker's pipes, so the parent sees the worker's death (end of file) even
  when such a process lives on.

The private environment variable ``MICROBATCH_WORKER_NO_PDEATHSIG=1`` skips ``prctl`` so that tests
can check the watching thread on its own.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections import OrderedDict
from types import ModuleType

TYPE_CHECKING = False
if TYPE_CHECKING:  # importing typing costs a fresh worker about 2 ms of CPU
    from collections.abc import Callable
    from typing import Any, BinaryIO


def _sibling(name: str) -> ModuleType:
    """Load ``NAME.py`` next to this file as ``microbatch.executors.NAME``, without the package's
    ``__init__`` files (which import anyio); a later ``import microbatch.executors.NAME`` reuses it."""
    import importlib.util

    full = f"microbatch.executors.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, os.path.join(os.path.dirname(__file__), f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


try:
    from . import remote  # imported by the parent, as microbatch.executors.worker
except ImportError:  # run as a script: there is no package around this file
    remote = _sibling("remote")

HEADER = struct.Struct("<BQQ")

# parent -> worker
INIT = 1
FN = 2
CALL = 3
# worker -> parent
READY = 10
LOADED = 14
TOO_LARGE = 15
RESULT = remote.RESULT
RAISED = remote.RAISED
REMOTE_ERROR = remote.REMOTE_ERROR

# parent <-> fork server (``serve_forks``): FORK carries the new worker's two pipe ends
FORK = 4
RELEASE = 5
FORKED = 16
FORK_FAILED = 17
EXITED = 18
#: A fork server's frames after INIT/READY: kind, pid, value (FORK_FAILED: errno; EXITED: exit code).
FORK_FRAME = struct.Struct("<Biq")
#: The argument that makes this script a fork server.
FORK_SERVER = "fork-server"

FN_CACHE_SIZE = 32
PIPE_SIZE = 1 << 20
PARENT_POLL_INTERVAL = 0.2
# Exit code used when the parent disappeared; distinct from crashes of user code.
EXIT_PARENT_GONE = 70


def _die_with_parent(parent_pid: int, *, watch: bool = True) -> None:
    """Die when ``parent_pid`` dies: ``PR_SET_PDEATHSIG`` where there is one, and (``watch``) a
    thread that polls the parent (a fork server polls in its own loop: it must have no thread)."""
    if sys.platform.startswith("linux") and os.environ.get("MICROBATCH_WORKER_NO_PDEATHSIG") != "1":
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no usable libc
            pass
    # The parent may have died before prctl took effect: then the worker was already re-parented.
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)

    def poll() -> None:
        while True:
            time.sleep(PARENT_POLL_INTERVAL)
            if os.getppid() != parent_pid:
                os._exit(EXIT_PARENT_GONE)

    if watch:
        threading.Thread(target=poll, name="microbatch-parent-watch", daemon=True).start()


def _private_fds() -> tuple[int, int]:
    """Close what the worker inherited beyond fds 0-2, move the protocol off fds 0 and 1; return
    (read fd, write fd).

    Some event loops (uvloop) let a child inherit descriptors besides the ones it was given: copies
    of its pipes, the loop's own. A process ``fn`` forks would hold them, and a copy of the worker's
    pipe held elsewhere hides the worker's death from the parent.
    """
    os.closerange(3, _max_fd())
    read_fd = os.dup(0)  # os.dup returns non-inheritable descriptors
    write_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    for fd in (read_fd, write_fd):
        _grow_pipe(fd)
    return read_fd, write_fd


def _max_fd() -> int:
    try:
        return max(os.sysconf("SC_OPEN_MAX"), 256)
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf
        return 1 << 16


def _grow_pipe(fd: int) -> None:
    """Let a pipe hold a whole batch (1 MiB, Linux only), so that sending one rarely waits for the reader."""
    if sys.platform.startswith("linux"):
        import fcntl

        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        except OSError:  # over /proc/sys/fs/pipe-max-size, or not a pipe: keep the default
            pass


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) != size:
        return None
    return data


def _rss_meter() -> Callable[[], int]:
    """A function that returns this process's resident memory in bytes (its peak where the
    current figure cannot be read)."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    page = os.sysconf("SC_PAGE_SIZE")
    return lambda: int(os.pread(fd, 64, 0).split()[1]) * page


def _no_meter() -> int:
    return 0


def _send(out: BinaryIO, kind: int, payload: bytes, token: int = 0) -> None:
    out.write(HEADER.pack(kind, token, len(payload)))
    out.write(payload)
    out.flush()


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer frames until the parent closes the pipe."""
    functions: OrderedDict[int, Any] = OrderedDict()
    rss = _no_meter
    max_answer = 1 << 62
    while True:
        header = _read_exactly(inp, HEADER.size)
        if header is None:
            return
        kind, token, size = HEADER.unpack(header)
        payload = _read_exactly(inp, size)
        if payload is None:
            return
        if kind == INIT:
            settings = pickle.loads(payload)
            sys.path[:] = settings["path"]
            if settings["measure_rss"]:
                rss = _rss_meter()
            max_answer = settings["max_result_bytes"]
            _send(out, READY, pickle.dumps(os.getpid()))
        elif kind == FN:
            try:
                functions[token] = (True, pickle.loads(payload))
            except BaseException as exc:  # e.g. the function's module does not import here
                functions[token] = (False, exc)
            if len(functions) > FN_CACHE_SIZE:
                functions.popitem(last=False)
            _send(out, LOADED, b"")
        elif kind == CALL:
            functions.move_to_end(token)
            loaded, fn = functions[token]
            if not loaded:  # the function could not be unpickled here: each call reports why
                outcome = remote.failure(fn)
            else:
                try:
                    arg = pickle.loads(payload)
                except BaseException as exc:  # pragma: no cover - the parent pickled it
                    outcome = remote.failure(exc)
                else:
                    outcome = remote.call(fn, arg)
                    del arg
            del payload
            kind, body = remote.encode(outcome)
            del outcome
            if len(body) > max_answer:  # the parent would not read it: say how large it was
                body = pickle.dumps((len(body), kind))
                kind = TOO_LARGE
            _send(out, kind, body, rss())
        else:  # pragma: no cover - a parent of another version
            raise SystemExit(f"microbatch worker: unknown frame kind {kind}")


def _drop_signal(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM are for the parent: the worker goes on (see the module docstring)."""


def _catch_group_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _drop_signal)
        signal.siginterrupt(signum, False)  # a system call in fn restarts; no EINTR for its sake


def _forked_child_defaults(read_fd: int, write_fd: int) -> None:
    """In a process forked from the worker without ``exec``: Python's own signal handling back, and
    the protocol descriptors pointed at ``/dev/null`` (it must not hold the worker's pipes)."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # pragma: no cover - forked from a thread that is not the main one
        pass
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (read_fd, write_fd):
        os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)


def serve_forks(sock_fd: int, parent_pid: int) -> None:
    """Be a fork server: after INIT (``sys.path``, the modules to ``preload``), fork a worker per
    FORK, report its pid (FORKED) and its end (EXITED, the exit code as ``Popen`` gives it), never
    returns. A worker ends as a zombie until the parent has reaped it (RELEASE): until then its pid,
    which is also its process group's id, is given to no other process. The server polls its
    parent (no thread: it forks) and, when the parent or its socket is gone, kills its workers'
    groups and exits."""
    import gc
    import select
    import socket

    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, _drop_signal)  # a handler, so that the wake-up fd is written
    signal.set_wakeup_fd(wake_w)
    children: dict[int, bool] = {}  # pid: its exit was reported
    watched: list[Any] = [sock, wake_r]

    def send(kind: int, pid: int, value: int) -> None:
        sock.sendall(FORK_FRAME.pack(kind, pid, value))

    def leave(code: int) -> None:
        for pid in children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:  # noqa: PERF203 - once per worker, when the server leaves
                pass
        os._exit(code)

    while True:
        ready, _, _ = select.select(watched, [], [], PARENT_POLL_INTERVAL)
        if os.getppid() != parent_pid:
            leave(EXIT_PARENT_GONE)
        if wake_r in ready:
            os.read(wake_r, 1 << 12)
        for pid, reported in list(children.items()):
            if not reported:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if info is not None and info.si_pid == pid:
                    children[pid] = True
                    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                    send(EXITED, pid, code)
        if sock not in ready:
            continue
        # The kind first: the descriptors a FORK carries come with the first byte of its frame.
        data, fds, _, _ = socket.recv_fds(sock, 1, 2)
        if not data:
            leave(0)  # the parent closed the socket (or died)
        if data[0] == INIT:
            _, _, size = HEADER.unpack(data + _receive(sock, HEADER.size - 1))
            settings = pickle.loads(_receive(sock, size))
            sys.path[:] = settings["path"]
            for name in settings.get("preload", ()):
                try:
                    __import__(name)
                except BaseException:  # noqa: PERF203 - a worker importing it reports the error
                    pass
            gc.freeze()  # the forked workers then leave the imported objects' pages shared
            sock.sendall(HEADER.pack(READY, 0, 0))
            continue
        kind, pid, _ = FORK_FRAME.unpack(data + _receive(sock, FORK_FRAME.size - 1))
        if kind == RELEASE:
            if children.pop(pid, None) is not None:
                os.waitpid(pid, 0)
            continue
        server_pid = os.getpid()
        try:
            child = os.fork()
        except OSError as exc:
            send(FORK_FAILED, 0, exc.errno or 0)
            child = -1
        if child == 0:
            _become_worker(fds, [sock_fd, wake_r, wake_w], server_pid)
        for fd in fds:
            os.close(fd)
        if child > 0:
            children[child] = False
            send(FORKED, child, 0)


def _receive(sock: Any, size: int) -> bytes:
    """Exactly ``size`` bytes from a blocking socket (a fork server's parent sends whole frames)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            os._exit(0)  # the parent is gone
        data += chunk
    return data


def _become_worker(fds: list[int], server_fds: list[int], server_pid: int) -> None:
    """In a process the fork server forked: lead a new session and process group, die with the
    server, serve the pipes in ``fds``; never returns."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in server_fds:
            os.close(fd)
        _die_with_parent(server_pid)
        read_fd, write_fd = fds
        for fd in fds:
            os.set_inheritable(fd, False)
            _grow_pipe(fd)
        _serve_fds(read_fd, write_fd)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):  # noqa: PERF203 - twice, at the end
                pass
        os._exit(code)


def _serve_fds(read_fd: int, write_fd: int) -> None:
    """Be a worker on the protocol descriptors: answer frames until the parent closes the pipe."""
    os.register_at_fork(after_in_child=lambda: _forked_child_defaults(read_fd, write_fd))
    with open(read_fd, "rb", buffering=1 << 16) as inp, open(write_fd, "wb", buffering=1 << 16) as out:
        serve(inp, out)


def main() -> None:
    _catch_group_signals()
    # Running this file put its folder first on sys.path; the parent's sys.path replaces it on INIT.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    parent_pid = int(sys.argv[1])
    forks = sys.argv[3:4] == [FORK_SERVER]
    _die_with_parent(parent_pid, watch=not forks)
    nice = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    read_fd, write_fd = _private_fds()
    if forks:
        os.close(write_fd)  # both are the one socket
        serve_forks(read_fd, parent_pid)
    else:
        _serve_fds(read_fd, write_fd)


if __name__ == "__main__":
    main()
