"""Prometheus metrics: a pipeline run's counters, a Batcher's, and ``microbatch run --metrics-port``
scraped over real HTTP on 127.0.0.1 while the command runs."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import microbatch as mb
from microbatch.metrics import BatcherMetrics, PipelineMetrics, batcher_metrics, serve

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"
GATED = str(JOBS / "gated_sum.py") + ":pipeline"
WAIT = 30.0


def _sum_lines(lines: list[str]) -> int:
    return sum(int(line) for line in lines)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


# --- a pipeline run, in the library ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_pipeline_metrics_match_the_run_stats(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.txt"
    numbers.write_text("".join(f"{i}\n" for i in range(5000)))
    pipeline = mb.Pipeline(_sum_lines, aggregate=mb.Sum(), max_size=500, workers=2, checkpoint_every=0)
    metrics = PipelineMetrics()
    updates_seen = 0
    async with pipeline.updates(mb.read_lines(numbers), checkpoint=str(tmp_path / "state")) as updates:
        async for update in updates:
            metrics.observe(update.stats)
            updates_seen += 1
            if updates_seen == 3:
                # Mid-run, the counters already hold what was folded so far.
                assert _value(metrics.registry, "microbatch_records_total") == update.stats.run_records
    stats = updates.stats
    metrics.observe(stats)
    assert updates.value == sum(range(5000))
    registry = metrics.registry
    assert _value(registry, "microbatch_records_total") == stats.run_records == 5000
    assert _value(registry, "microbatch_batches_total") == stats.run_batches == 10
    assert _value(registry, "microbatch_checkpoints_total") == stats.checkpoints > 0
    for name in ("retries", "worker_crashes", "timeouts", "dead_letters", "batch_errors"):
        assert _value(registry, f"microbatch_{name}_total") == 0
    assert _value(registry, "microbatch_batch_latency_seconds_count") == updates_seen
    assert _value(registry, "microbatch_queue_depth") == stats.queue_depth
    assert _value(registry, "microbatch_in_flight_batches") == stats.in_flight

    # The registry is the run's own: a second run in this process counts from zero, and serving it
    # on 127.0.0.1 gives the same numbers over HTTP.
    again = PipelineMetrics()
    assert again.registry.get_sample_value("microbatch_records_total") == 0
    with serve(registry) as server:
        assert server.host == "127.0.0.1"
        async with httpx.AsyncClient() as client:
            response = await client.get(server.url)
    assert response.status_code == 200
    assert re.search(r"^microbatch_records_total 5000\.0$", response.text, re.M), response.text


def test_counters_only_grow_and_registries_do_not_collide() -> None:
    from dataclasses import dataclass

    @dataclass
    class Snapshot:
        run_records: int = 0
        run_batches: int = 0
        retries: int = 0
        last_latency: float = 0.0
        dead_letters: int = 0

        @property
        def good_records(self) -> int:
            return self.run_records - self.dead_letters

    metrics = PipelineMetrics()
    metrics.observe(Snapshot(run_records=10, run_batches=1, last_latency=0.2))
    metrics.observe(Snapshot(run_records=10, run_batches=1, last_latency=0.2))  # no batch folded
    metrics.observe(Snapshot(run_records=25, run_batches=3, retries=2, last_latency=0.7))
    assert _value(metrics.registry, "microbatch_records_total") == 25
    assert _value(metrics.registry, "microbatch_retries_total") == 2
    assert _value(metrics.registry, "microbatch_batch_latency_seconds_count") == 2
    assert _value(metrics.registry, "microbatch_batch_latency_seconds_sum") == pytest.approx(0.9)
    metrics.observe(Snapshot(run_records=5, run_batches=1))  # a new run's stats: never a decrease
    assert _value(metrics.registry, "microbatch_records_total") == 25
    metrics.observe(Snapshot(run_records=8, run_batches=1))
    assert _value(metrics.registry, "microbatch_records_total") == 28
    # A shared registry must be given deliberately; the same names twice in one registry collide.
    shared = CollectorRegistry()
    PipelineMetrics(shared)
    with pytest.raises(ValueError, match="Duplicated"):
        PipelineMetrics(shared)
    PipelineMetrics(shared, namespace="other")


# --- Batcher ----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_batcher_metrics_move_under_load() -> None:
    release = anyio.Event()

    async def double(items: list[int]) -> list[int]:
        await release.wait()
        return [2 * i for i in items]

    results: list[int] = []
    async with mb.Batcher(double, max_size=32, max_wait=0.001) as batcher:
        async with batcher_metrics(batcher, interval=0.01) as metrics:
            registry = metrics.registry
            assert _value(registry, "microbatch_batcher_items_total") == 0

            async def call(i: int) -> None:
                results.append(await batcher.submit(i))

            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(call, i)
                # While fn holds its first batch, the sampler shows it running and the rest pending.
                with anyio.fail_after(WAIT):
                    while registry.get_sample_value("microbatch_batcher_running") != 1:
                        await anyio.sleep(0.01)
                assert _value(registry, "microbatch_batcher_items_total") == 32
                assert _value(registry, "microbatch_batcher_pending") == 68
                release.set()
        stats = batcher.stats
    assert sorted(results) == [2 * i for i in range(100)]
    assert _value(registry, "microbatch_batcher_items_total") == 100 == stats.items
    assert _value(registry, "microbatch_batcher_batches_total") == stats.batches
    flushes = sum(
        _value(registry, "microbatch_batcher_flushes_total", reason=r) for r in ("size", "time", "close")
    )
    assert flushes == stats.batches
    assert _value(registry, "microbatch_batcher_flushes_total", reason="size") == stats.flushed_by_size >= 3
    assert _value(registry, "microbatch_batcher_wait_seconds_total") == pytest.approx(stats.wait_total)
    assert _value(registry, "microbatch_batcher_running") == 0


def test_batcher_metrics_observe_a_snapshot() -> None:
    metrics = BatcherMetrics()
    metrics.observe(mb.BatcherStats(items=7, batches=2, flushed_by_time=2, pending=3))
    assert _value(metrics.registry, "microbatch_batcher_items_total") == 7
    assert _value(metrics.registry, "microbatch_batcher_flushes_total", reason="time") == 2
    assert _value(metrics.registry, "microbatch_batcher_pending") == 3


def test_batcher_metrics_interval_must_be_positive() -> None:
    async def main() -> None:
        async with mb.Batcher(lambda xs: xs, max_size=2, max_wait=0.01) as batcher:
            async with batcher_metrics(batcher, interval=0):
                pass

    with pytest.raises(ValueError, match="interval must be > 0 seconds, got 0"):
        anyio.run(main)


# --- the command -----------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(JOBS), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("MB_TEST_GATE", None)
    return env


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Stderr:
    """What the child wrote to stderr so far, read without blocking."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.proc, self.fd, self.text = proc, proc.stderr.fileno(), ""

    def read(self) -> str:
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 65536)
            if not data:
                break
            self.text += data.decode()
        return self.text

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + WAIT
        while (found := re.search(pattern, self.read())) is None:
            assert self.proc.poll() is None, f"the command exited: {self.text}"
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text!r}"
            time.sleep(0.01)
        return found


def _scrape(url: str) -> dict[str, float]:
    response = httpx.get(url, timeout=WAIT)
    assert response.status_code == 200
    return {
        sample.name + ("" if not sample.labels else str(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_command_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "microbatch", "run", GATED, "--input", "tcp://127.0.0.1:0"]
    argv += ["--metrics-port", "0", "--max-wait", "0", "--no-progress", "--json"]
    argv += ["--checkpoint", str(tmp_path / "state"), "--checkpoint-every", "0"]
    proc = subprocess.Popen(
        argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_reset_signals
    )
    stderr = _Stderr(proc)
    try:
        url = stderr.wait_for(r"serving metrics at (http://127\.0\.0\.1:\d+/metrics)").group(1)
        port = int(stderr.wait_for(r"listening on (?:tcp://)?127\.0\.0\.1:(\d+)").group(1))
        assert _scrape(url)["microbatch_records_total"] == 0
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall("".join(f"{i}\n" for i in range(1, 101)).encode())
            deadline = time.monotonic() + WAIT
            while (scraped := _scrape(url))["microbatch_records_total"] < 100:
                assert time.monotonic() < deadline, scraped
                time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, rest = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    text = stderr.text + rest.decode()
    assert proc.returncode == 143, text
    assert stdout.decode().strip() == "5050"
    summary = re.search(r"after 100 records in (\d+) batch", text)
    assert summary, text
    assert scraped["microbatch_records_total"] == 100
    assert scraped["microbatch_batches_total"] == int(summary.group(1))
    assert scraped["microbatch_batch_latency_seconds_count"] == scraped["microbatch_batches_total"]
    assert scraped["microbatch_checkpoints_total"] >= 1
    assert scraped["microbatch_dead_letters_total"] == 0
    with pytest.raises(httpx.ConnectError):  # the endpoint closed with the command
        httpx.get(url, timeout=WAIT)


def test_metrics_port_in_use_is_a_usage_error(tmp_path: Path) -> None:
    numbers = tmp_path / "n.txt"
    numbers.write_text("1\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "microbatch",
                "run",
                GATED,
                "-i",
                str(numbers),
                "--metrics-port",
                str(port),
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    assert result.returncode == 2, result.stderr
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in result.stderr
