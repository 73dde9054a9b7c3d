"""``microbatch run`` prints closed windows as they close; ``inspect`` shows the open ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import microbatch as mb

ROOT = Path(__file__).resolve().parents[1]
JOB = f"{ROOT / 'examples' / 'windows.py'}:pipeline"
LOG = ROOT / "examples" / "data" / "access.log"
WAIT = 120


def _microbatch(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "microbatch", *argv], capture_output=True, text=True,
                          env=env, timeout=WAIT)


def _example() -> mb.Pipeline[Any, Any]:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from windows import pipeline  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return pipeline  # type: ignore[no-any-return]


def _expected() -> list[mb.WindowResult]:
    pipeline = _example().replace(executor="inline")
    windows: list[mb.WindowResult] = anyio.run(lambda: pipeline.run(mb.read_lines(LOG)))
    return windows


@pytest.fixture(scope="module")
def expected() -> list[mb.WindowResult]:
    return _expected()


def test_each_window_is_a_line_of_iso_times_key_and_value(expected: list[mb.WindowResult]) -> None:
    done = _microbatch("run", JOB, "--input", str(LOG), "--no-progress", "--workers", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(expected) > 40
    first = expected[0]
    assert lines[0] == f"2024-05-01T12:00:00Z 2024-05-01T12:01:00Z {first.key} {first.value}"
    assert [line.split()[2:] for line in lines] == [[w.key, str(w.value)] for w in expected]
    assert sum(int(line.split()[3]) for line in lines) == len(LOG.read_text().splitlines())


def test_json_gives_one_object_per_window_and_no_final_value(expected: list[mb.WindowResult]) -> None:
    done = _microbatch("run", JOB, "--input", str(LOG), "--no-progress", "--json", "--workers", "1")
    assert done.returncode == 0, done.stderr
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert objects == [w.to_json() for w in expected]
    assert objects[0]["start"] == "2024-05-01T12:00:00Z" and objects[0]["end"] == "2024-05-01T12:01:00Z"


def test_inspect_shows_the_watermark_and_the_open_windows(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pipeline = _example().replace(executor="inline", max_size=20, checkpoint_every_batches=1)

    async def take_five() -> None:
        async with pipeline.windows(mb.read_lines(LOG), checkpoint=state) as windows:
            async for i, _ in _enumerate(windows):
                if i == 4:
                    break  # the checkpoints of the batches before: some windows still open

    anyio.run(take_five)
    shown = _microbatch("inspect", str(state))
    assert shown.returncode == 0, shown.stderr
    assert "watermark     2024-05-01T12:0" in shown.stdout
    info = json.loads(_microbatch("inspect", str(state), "--json").stdout)
    summary = info["windows"]
    assert summary["open_windows"] and summary["emitted"] >= 0 and summary["late_records"] == 0
    assert all(" (" in span and "keys)" in span for span in summary["open_windows"])


async def _enumerate(windows: Any) -> Any:
    i = 0
    async for window in windows:
        yield i, window
        i += 1
