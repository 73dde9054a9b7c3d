"""`microbatch run ... --dask tcp://HOST:PORT` against a real local cluster.

Dask's client runs on asyncio only, so the in-process comparison is an asyncio-only test, served
by pytest-asyncio (anyio's plugin serves the tests that run on every backend).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dask_cluster import START_TIMEOUT, dask_cluster

distributed = pytest.importorskip("distributed")

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tests = str(Path(__file__).parent)  # the workers import this module's functions by name
    with dask_cluster(tmp_path_factory.mktemp("dask"), workers=2, pythonpath=[tests]) as cluster:
        with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
        yield cluster.scheduler_address


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microbatch", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_on_a_dask_cluster_gives_the_exact_value(scheduler: str, tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("".join(f"{i}\n" for i in range(20_000)))
    done = run(
        f"{EXAMPLES / 'sum_integers.py'}:pipeline",
        "--input", str(numbers),
        "--dask", scheduler,
        "--max-size", "2000",
        "--json", "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == sum(range(20_000))


@pytest.mark.asyncio
async def test_the_command_and_the_library_agree_on_the_cluster(scheduler: str, tmp_path: Path) -> None:
    import microbatch as mb

    numbers = tmp_path / "numbers.txt"
    numbers.write_text("".join(f"{3 * i}\n" for i in range(9_000)))
    job = f"{EXAMPLES / 'sum_integers.py'}:pipeline"
    done = run(job, "--input", str(numbers), "--dask", scheduler, "--max-size", "1000", "--no-progress")
    assert done.returncode == 0, done.stderr
    pipeline = mb.Pipeline(
        _sum_lines, aggregate=mb.Sum(), max_size=1000, executor=mb.DaskExecutor(scheduler)
    )
    in_process = await pipeline.run(mb.read_lines(numbers))
    assert done.stdout == f"{in_process}\n" == f"{3 * sum(range(9_000))}\n"


def _sum_lines(lines: list[str]) -> int:
    return sum(int(line) for line in lines)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:8786", "http://127.0.0.1:8786", "tcp://127.0.0.1", "tcp://host:port"]
)
def test_a_malformed_scheduler_address_is_a_usage_error(address: str) -> None:
    done = run(f"{EXAMPLES / 'sum_integers.py'}:pipeline", "--input", "-", "--dask", address)
    assert done.returncode == 2
    assert "--dask" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_dask_and_workers_together_is_a_usage_error() -> None:
    done = run(
        f"{EXAMPLES / 'sum_integers.py'}:pipeline", "--input", "-",
        "--dask", "tcp://127.0.0.1:8786", "--workers", "2",
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr
