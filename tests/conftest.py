"""Shared fixtures: every async test runs on asyncio, asyncio+uvloop and trio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _procs import remember_existing

_BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform != "win32":
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
    else:
        _BACKENDS.insert(1, pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _existing_children() -> None:
    """Lets tests tell the processes they started from those that were already there."""
    remember_existing()


#: The numbers the command's tests sum (0..999, one a line).
NUMBERS = [str(i) for i in range(1000)]


@pytest.fixture
def numbers(tmp_path: Path) -> Path:
    path = tmp_path / "numbers.txt"
    path.write_text("\n".join(NUMBERS) + "\n")
    return path


@pytest.fixture
def paused_numbers(tmp_path: Path) -> Path:
    """The numbers with a ``pause`` line after 500 of them (batch 50 of 10 lines pauses)."""
    path = tmp_path / "paused.txt"
    path.write_text("\n".join([*NUMBERS[:500], "pause", *NUMBERS[500:]]) + "\n")
    return path
