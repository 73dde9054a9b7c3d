"""A job for the command's tests: sums integer lines, and can pause on a line reading ``pause``.

With ``MB_TEST_GATE`` set to a folder, the worker that meets the ``pause`` line writes
``paused-<pid>`` there and waits until a file named ``release`` appears, so that a test can act
while a batch is in flight, without guessing times. Without it, ``pause`` counts as 0.

Used both as a job file (``tests/jobs/gated_sum.py:pipeline``) and as a module
(``gated_sum:pipeline`` with ``tests/jobs`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import microbatch as mb

GATE_TIMEOUT = 60.0


def _wait_at_gate(gate: Path) -> None:
    (gate / f"paused-{os.getpid()}").write_text("")
    deadline = time.monotonic() + GATE_TIMEOUT
    while not (gate / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate}/release did not appear within {GATE_TIMEOUT} s")
        time.sleep(0.01)


def sum_lines(lines: list[str]) -> int:
    """Runs in a worker: the sum of a batch of integer lines."""
    total = 0
    for line in lines:
        if line == "pause":
            gate = os.environ.get("MB_TEST_GATE")
            if gate:
                _wait_at_gate(Path(gate))
            continue
        total += int(line)
    return total


pipeline = mb.Pipeline(
    sum_lines, aggregate=mb.Sum(), max_size=10, workers=1, timeout=30.0, checkpoint_every_batches=1
)

not_a_pipeline = 42
