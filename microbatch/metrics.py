"""Prometheus metrics for pipelines and ``Batcher``, through ``prometheus-client``.

Needs the ``metrics`` extra: ``pip install 'microbatch[metrics]'``. Nothing in a pipeline or a
batcher changes: the metrics are fed from the counters they already keep.

- :class:`PipelineMetrics`: call :meth:`~PipelineMetrics.observe` with ``update.stats`` once per
  update (and once more with the final stats after the run, to count the last checkpoint).
- :class:`BatcherMetrics` and :func:`batcher_metrics`: sample ``batcher.stats`` every ``interval``
  seconds in the event loop, and once more when the block ends.
- :func:`serve`: an HTTP endpoint ``/metrics`` for a registry, bound to 127.0.0.1 by default.

Each metrics object gets its own ``CollectorRegistry`` unless one is given, so two runs in one
process never collide on metric names; pass ``prometheus_client.REGISTRY`` to use the global one.
The names are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "microbatch.metrics needs the prometheus-client package: pip install 'microbatch[metrics]'"
    ) from exc

from ._core.params import check_int, check_seconds

__all__ = [
    "LATENCY_BUCKETS",
    "BatcherMetrics",
    "MetricsServer",
    "PipelineMetrics",
    "batcher_metrics",
    "serve",
]

#: Upper bounds (seconds) of the batch latency histogram: from 5 ms to two minutes.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# (stats field, metric name, help) of the pipeline's counters; the names get a ``_total`` suffix.
_PIPELINE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("good_records", "records", "Records folded by this run whose results count (not dead letters)."),
    ("run_batches", "batches", "Batches folded by this run."),
    ("retries", "retries", "Batch attempts retried after a failure, crash or timeout."),
    ("crashes", "worker_crashes", "Worker processes that died while running a batch."),
    ("timeouts", "timeouts", "Batches whose worker was killed for running past the timeout."),
    ("errors", "batch_errors", "Batch attempts that raised an exception in fn."),
    ("dead_letters", "dead_letters", "Records written to the dead-letter file."),
    ("checkpoints", "checkpoints", "Checkpoints written."),
)


def _number(stats: Any, name: str) -> float:
    value = getattr(stats, name, 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class PipelineMetrics:
    """Prometheus metrics of one pipeline run, fed with the run's ``Stats``.

    Counters (``<namespace>_records_total``, ``_batches_total``, ``_retries_total``,
    ``_worker_crashes_total``, ``_timeouts_total``, ``_batch_errors_total``, ``_dead_letters_total``,
    ``_checkpoints_total``), gauges (``_queue_depth``, ``_in_flight_batches``) and a histogram of
    batch latency in seconds (``_batch_latency_seconds``, ``buckets`` default
    :data:`LATENCY_BUCKETS`; one observation of ``stats.last_latency`` per call in which batches
    were folded).

    :meth:`observe` takes the cumulative counters of a ``Stats`` snapshot and adds what grew since
    the last call, so calling it once per update, or less often, gives the same totals. Records and
    batches count this run's work (``good_records``, ``run_batches``), not what a resumed run
    inherited from its checkpoint; records that failed count in ``_dead_letters_total`` only.
    ``registry`` defaults to a new ``CollectorRegistry``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = "microbatch",
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._counters = {
            field: Counter(name, doc, namespace=namespace, registry=self.registry)
            for field, name, doc in _PIPELINE_COUNTERS
        }
        self._seen = dict.fromkeys(self._counters, 0.0)
        self.queue_depth = Gauge(
            "queue_depth", "Batches waiting for a worker.", namespace=namespace, registry=self.registry
        )
        self.in_flight = Gauge(
            "in_flight_batches", "Batches running in workers.", namespace=namespace, registry=self.registry
        )
        self.latency = Histogram(
            "batch_latency_seconds",
            "Seconds from a batch being cut to its result being folded.",
            namespace=namespace,
            registry=self.registry,
            buckets=tuple(buckets),
        )
        self._lock = threading.Lock()

    def observe(self, stats: Any) -> None:
        """Bring the metrics up to ``stats`` (a pipeline's ``Stats``, e.g. ``update.stats``).

        A counter that went down (a new run's stats given to the same object) starts counting
        again from the new value's growth; counters never decrease.
        """
        with self._lock:
            folded = False
            for field, counter in self._counters.items():
                value = _number(stats, field)
                grown = value - self._seen[field]
                if grown > 0:
                    counter.inc(grown)
                    folded = folded or field == "run_batches"
                self._seen[field] = value
            self.queue_depth.set(_number(stats, "queue_depth"))
            self.in_flight.set(_number(stats, "in_flight"))
            if folded:
                self.latency.observe(_number(stats, "last_latency"))


class BatcherMetrics:
    """Prometheus metrics of a ``Batcher``, fed with its ``BatcherStats``.

    Counters (``<namespace>_batcher_items_total``, ``_batches_total``, ``_batch_errors_total``,
    ``_item_errors_total``, ``_cancelled_total``, ``_wait_seconds_total`` (the sum over items of
    the time from ``submit`` to dispatch: divide its rate by the items' rate for the mean wait),
    ``_flushes_total`` with a ``reason`` label: ``size``, ``time`` or ``close``) and gauges
    (``_pending``, ``_blocked``, ``_running``). ``registry`` defaults to a new ``CollectorRegistry``.
    """

    _COUNTERS = (
        ("items", "items", "Items given to fn."),
        ("batches", "batches", "Batches given to fn."),
        ("batch_errors", "batch_errors", "Batches that failed as a whole."),
        ("item_errors", "item_errors", "Items whose result was an exception."),
        ("cancelled", "cancelled", "Items withdrawn because their caller was cancelled."),
        ("wait_total", "wait_seconds", "Seconds items waited from submit to dispatch, summed."),
    )
    _GAUGES = (
        ("pending", "Items queued for a batch."),
        ("blocked", "Callers waiting for room in the queue."),
        ("running", "Batches being processed by fn."),
    )

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "microbatch") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ns = f"{namespace}_batcher"
        self._counters = {
            field: Counter(name, doc, namespace=ns, registry=self.registry)
            for field, name, doc in self._COUNTERS
        }
        self.flushes = Counter(
            "flushes", "Batches cut, by reason.", ["reason"], namespace=ns, registry=self.registry
        )
        for reason in ("size", "time", "close"):
            self._counters[f"flushed_by_{reason}"] = self.flushes.labels(reason=reason)
        self._gauges = {
            field: Gauge(field, doc, namespace=ns, registry=self.registry) for field, doc in self._GAUGES
        }
        self._seen = dict.fromkeys(self._counters, 0.0)
        self._lock = threading.Lock()

    def observe(self, stats: Any) -> None:
        """Bring the metrics up to ``stats`` (``batcher.stats``); counters add what grew."""
        with self._lock:
            for field, counter in self._counters.items():
                value = _number(stats, field)
                if value > self._seen[field]:
                    counter.inc(value - self._seen[field])
                self._seen[field] = value
            for field, gauge in self._gauges.items():
                gauge.set(_number(stats, field))


@asynccontextmanager
async def batcher_metrics(
    batcher: Any,
    metrics: BatcherMetrics | None = None,
    *,
    interval: float = 1.0,
) -> AsyncIterator[BatcherMetrics]:
    """Sample ``batcher.stats`` into ``metrics`` every ``interval`` seconds (default 1) while open.

    Yields the ``BatcherMetrics`` (a new one, with its own registry, unless given). Samples once on
    entry and once on exit, so the totals are exact when the block ends. The sampling task runs in
    the caller's event loop (asyncio or trio) and is cancelled when the block ends.
    """
    import anyio

    check_seconds("interval", interval)
    metrics = metrics if metrics is not None else BatcherMetrics()

    async def sample() -> None:
        while True:
            await anyio.sleep(interval)
            metrics.observe(batcher.stats)

    metrics.observe(batcher.stats)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            try:
                yield metrics
            finally:
                tg.cancel_scope.cancel()
    finally:
        metrics.observe(batcher.stats)


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (see :func:`serve`); ``close()`` or ``with`` stops it."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        address = self._httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://HOST:PORT/metrics`` from a daemon thread.

    ``port`` 0 (the default) picks a free port: read it from the result's ``port``. ``host`` is
    127.0.0.1 unless told otherwise: metrics describe your data flow, so widen it deliberately.
    Raises ``OSError`` when the port cannot be bound.
    """
    check_int("port", port, minimum=0, maximum=65535)
    return MetricsServer(registry, port, host)
