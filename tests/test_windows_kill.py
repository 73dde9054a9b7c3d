"""kill -9 over a followed file with windows (a few kills here; ``python tests/windows_kill.py 25``
runs more): deduplicated output equal to the model, no window again after its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from windows_kill import run_trials


@pytest.mark.parametrize("kind", ["tumbling", "session"])
def test_kill_9_with_windows_repeats_only_what_no_checkpoint_recorded(tmp_path: Path, kind: str) -> None:
    assert run_trials(tmp_path, kills=4, kind=kind, lines=8000, seed=11) == 4


def test_kill_9_while_taking_windows_from_pipeline_windows(tmp_path: Path) -> None:
    assert run_trials(tmp_path, kills=4, kind="hopping", lines=8000, seed=12, library=True) == 4


def test_kill_9_while_taking_windows_by_window(tmp_path: Path) -> None:
    assert run_trials(tmp_path, kills=4, kind="tumbling", lines=8000, seed=13, library="by_window") == 4
