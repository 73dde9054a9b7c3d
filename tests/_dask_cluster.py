"""A Dask cluster on 127.0.0.1 started as a user starts one: a ``dask scheduler`` process and a
``dask worker --nworkers N --nthreads 1`` process whose nannies each run one worker process.

Neither the scheduler nor the nannies live in the process that uses the cluster. A ``LocalCluster``
would put them there, and as a ``SpecCluster`` it closes a worker's nanny for good when, at
``distributed.deploy.lost-worker-timeout`` (15 s) after *any* departure of that worker, no worker of
that name is connected. A nanny restarting a worker that a test killed on purpose is then closed
whenever an earlier kill's 15 s fall inside a later restart, which on a loaded machine (a restart
takes seconds there) happens often, and the cluster stays one worker short. Nannies started by
``dask worker`` restart their worker however often it dies.

Every process of the cluster runs in its own process group, dies with the process that started it
(``PR_SET_PDEATHSIG``), and is gone when the context manager exits. Workers import modules from
``pythonpath`` (test modules whose functions tasks name by reference) and from this interpreter's
``sys.path``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: How long the scheduler and the workers may take to start (a loaded 2-core machine needs seconds).
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class DaskCluster:
    """A running cluster: ``DaskExecutor`` accepts it as it accepts a ``LocalCluster``."""

    scheduler_address: str
    folder: Path

    def logs(self) -> str:
        """The end of the scheduler's and the workers' logs, for an error message."""
        tails = []
        for name in ("scheduler.log", "workers.log"):
            path = self.folder / name
            if path.exists():
                tails.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(tails)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a graceful close), then SIGKILL to whatever is left of the process's group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _scheduler_address(scheduler_file: Path, scheduler: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if scheduler.poll() is not None:
            raise RuntimeError(f"the Dask scheduler exited with status {scheduler.returncode}")
        try:
            address: str = json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            # Not written yet, or being written: the scheduler writes it once it listens.
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Dask scheduler wrote no {scheduler_file} in {START_TIMEOUT} s"
                ) from None
            time.sleep(0.05)
        else:
            return address


@contextlib.contextmanager
def dask_cluster(folder: Path, *, workers: int = 2, pythonpath: Sequence[str] = ()) -> Iterator[DaskCluster]:
    """Start a scheduler and ``workers`` single-threaded worker processes; logs go to ``folder``.

    Yields once the scheduler listens; the workers may still be connecting (wait for them with a
    client's ``wait_for_workers``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, *sys.path])}
    scheduler_file = folder / "scheduler.json"
    scheduler = _start(
        ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file)],
        folder / "scheduler.log", env,
    )  # fmt: skip
    nannies = None
    try:
        address = _scheduler_address(scheduler_file, scheduler)
        nannies = _start(
            ["distributed.cli.dask_worker", address, "--nworkers", str(workers), "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(folder / "workers")],
            folder / "workers.log", env,
        )  # fmt: skip
        yield DaskCluster(address, folder)
    finally:
        if nannies is not None:
            _stop(nannies)
        _stop(scheduler)
