"""Each layer that the sources and the deadline wait touch imports on its own, first, in a fresh
interpreter: the TCP server, the service and the batching module share the deadline wait
(``_waits``), which imports none of them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MODULES = [
    "microbatch._waits",
    "microbatch._batching",
    "microbatch.checkpoints.session",
    "microbatch.service",
    "microbatch.sources",
    "microbatch.sources.tcpserve",
    "microbatch.pipeline.reader",
]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
