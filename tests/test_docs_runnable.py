"""The code blocks of README.md and docs/*.md marked runnable run as they are written.

A fenced block whose info string is ``python runnable``, ``sh runnable`` or ``console runnable`` is
run in a scratch folder holding a copy of ``examples/`` (and ``examples/data/numbers.txt`` as
``numbers.txt``), with ``microbatch`` and ``python`` on ``PATH``:

- ``python runnable``: saved as a script and run with ``python``; it must exit 0.
- ``sh runnable``: run with ``sh -e``; it must exit 0.
- ``console runnable``: each ``$ command`` runs with ``sh``; the lines after it, up to the next
  ``$`` or a ``...`` line, are what it prints on stdout, in order; lines starting with
  ``microbatch:`` are the command's messages on stderr (times vary) and are not compared.

Mark a block runnable only when it runs as-is on the bundled examples.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(?P<lang>python|sh|console) runnable\s*\n(?P<body>.*?)^```\s*$", re.S | re.M)
TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def runnable_blocks() -> list[Block]:
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for found in FENCE.finditer(text):
            line = text.count("\n", 0, found.start()) + 1
            blocks.append(Block(path, line, found["lang"], found["body"]))
    return blocks


BLOCKS = runnable_blocks()


def test_the_docs_mark_blocks_of_every_kind() -> None:
    """The marker is in use: a renamed marker must not silently leave nothing to run."""
    assert {"python", "console"} <= {b.lang for b in BLOCKS}, [str(b) for b in BLOCKS]
    assert any(b.path.name == "README.md" for b in BLOCKS)


@pytest.fixture
def scratch(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copy(ROOT / "examples" / "data" / "numbers.txt", tmp_path / "numbers.txt")
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    launcher = bin_dir / "microbatch"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m microbatch "$@"\n')
    launcher.chmod(0o755)
    python = bin_dir / "python"  # `python` in a block is this interpreter, venv activated or not
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return tmp_path, env


def _console_steps(body: str) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def _expected_stdout(lines: list[str]) -> list[str]:
    expected = []
    for line in lines:
        if line.strip() == "...":
            break
        if not line.startswith("microbatch:"):
            expected.append(line)
    return expected


def _run(argv: list[str], folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_runnable_block(block: Block, scratch: tuple[Path, dict[str, str]]) -> None:
    folder, env = scratch
    if block.lang == "python":
        script = folder / "block.py"
        script.write_text(block.body)
        done = _run([sys.executable, str(script)], folder, env)
        assert done.returncode == 0, f"{block}: {done.stderr}"
        return
    if block.lang == "sh":
        done = _run(["sh", "-e", "-c", block.body], folder, env)
        assert done.returncode == 0, f"{block}: {done.stderr}"
        return
    steps = _console_steps(block.body)
    assert steps, f"{block}: a console block without a '$ command' line"
    for command, output in steps:
        done = _run(["sh", "-c", command], folder, env)
        assert done.returncode == 0, f"{block}: {command}: {done.stderr}"
        expected = _expected_stdout(output)
        got = done.stdout.splitlines()[: len(expected)]
        assert got == expected, f"{block}: {command}"
