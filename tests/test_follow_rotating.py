"""A followed log written at full speed by a real ``logging.handlers.RotatingFileHandler``.

The writer runs in a thread while the reader follows; the test ends when every line has arrived
(``fail_after`` is only a safety net). Lines lost must be 0, duplicated 0, and the order kept.
"""

from __future__ import annotations

import logging
import logging.handlers
import shutil
import threading
import time
from pathlib import Path

import anyio
import pytest

import microbatch as mb

pytestmark = pytest.mark.anyio

SAFETY = 60  # seconds; a net for a stuck test, not a timing assumption


def _write_rotating(path: Path, lines: int, max_bytes: int, name: str) -> None:
    """Log ``lines`` numbered lines as fast as the handler goes, rotating every ``max_bytes``."""
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=1000)
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(lines):
            logger.info("%d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()


async def _collect(source: mb.sources.LineSource[str], expected: int, writer: object) -> list[int]:
    got: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, writer)
        with anyio.fail_after(SAFETY):
            async for line in source:
                got.append(int(line))
                if len(got) == expected:
                    break
    return got


@pytest.mark.parametrize(("max_bytes", "lines"), [(20_000, 40_000), (2_000, 8_000)])
async def test_rotations_at_full_speed_lose_nothing(tmp_path: Path, max_bytes: int, lines: int) -> None:
    path = tmp_path / "app.log"
    path.touch()  # the reader starts on the first file
    source = mb.read_lines(path, follow=True, poll_interval=0.2)
    got = await _collect(source, lines, lambda: _write_rotating(path, lines, max_bytes, f"rot{max_bytes}"))
    rotated = len(list(tmp_path.glob("app.log.*")))
    assert rotated >= 10, "the test must rotate many times"
    assert got == list(range(lines))


async def test_copytruncate_loss_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """~20 k lines/s, copied and truncated every 0.5 s (logrotate's copytruncate): measured.

    Lines can be lost (written between the reader's last read and the truncation); they must
    never be duplicated or reordered, and a loss must come with a WARNING naming the file.
    """
    path, lines, rate = tmp_path / "app.log", 20_000, 20_000
    path.touch()
    written = threading.Event()

    def write() -> None:
        with open(path, "a", buffering=1) as f:
            t0 = time.monotonic()
            for i in range(lines):
                f.write(f"{i}\n")
                if i % 200 == 0:  # pace the writer at ~rate lines/s (a load, not an ordering)
                    ahead = i / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        written.set()

    def rotate() -> None:
        n = 0
        while not written.wait(0.5):
            n += 1
            shutil.copyfile(path, f"{path}.{n}")
            with open(path, "r+") as f:
                f.truncate(0)
        with open(path, "a") as f:
            f.write("-1\n")  # after the last truncation: the end mark

    caplog.set_level(logging.WARNING, "microbatch.sources")
    got: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, write)
        tg.start_soon(anyio.to_thread.run_sync, rotate)
        with anyio.fail_after(SAFETY):
            async for line in mb.read_lines(path, follow=True):
                if line == "-1":
                    break
                got.append(int(line))
    assert got == sorted(set(got)), "duplicated or reordered lines"
    lost = lines - len(got)
    truncations = [r for r in caplog.records if "truncated at byte" in r.getMessage()]
    assert truncations or lost == 0, "lines were lost without a warning"
    assert all(str(path) in r.getMessage() for r in truncations)
    print(f"copytruncate every 0.5 s at {rate} lines/s: {lost} of {lines} lines lost "
          f"({100 * lost / lines:.2f} %), {len(truncations)} truncations reported")
