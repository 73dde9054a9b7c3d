"""``microbatch run --metrics-port N``: the run's Prometheus metrics at ``http://HOST:N/metrics``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .codes import UsageError
from .logs import log

if TYPE_CHECKING:
    from ..metrics import MetricsServer, PipelineMetrics
    from .progress import Display


class MetricsFeed:
    """A display that shows nothing but brings the run's metrics up to every update's stats."""

    def __init__(self, metrics: PipelineMetrics) -> None:
        self.metrics = metrics

    def start(self, total: int | None, initial: int) -> None:
        pass

    def update(self, stats: Any) -> None:
        self.metrics.observe(stats)

    def close(self) -> None:
        pass


class Displays:
    """Several displays as one: each call goes to each of them, in order."""

    def __init__(self, *displays: Display) -> None:
        self.displays = displays

    def start(self, total: int | None, initial: int) -> None:
        for display in self.displays:
            display.start(total, initial)

    def update(self, stats: Any) -> None:
        for display in self.displays:
            display.update(stats)

    def close(self) -> None:
        for display in self.displays:
            display.close()


def open_metrics(port: int, host: str) -> tuple[MetricsFeed, MetricsServer]:
    """Serve a new registry's pipeline metrics on ``host:port`` (0: a free port) and log the URL.

    Raises ``UsageError`` when prometheus-client is not installed or the port cannot be bound.
    """
    try:
        from ..metrics import PipelineMetrics, serve
    except ImportError as exc:
        raise UsageError(f"--metrics-port: {exc}") from None
    metrics = PipelineMetrics()
    try:
        server = serve(metrics.registry, port, host)
    except OSError as exc:
        raise UsageError(
            f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    log.info("serving metrics at %s", server.url)
    return MetricsFeed(metrics), server
