"""What chatd counts: /stats reads it, and Prometheus scrapes it when enabled.

:class:`Metrics` is plain counters (always on, cheap).  :class:`PrometheusMetrics`
also feeds prometheus-client (the ``metrics`` extra) and serves it on
``--metrics-port``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from typing import Any

log = logging.getLogger(__name__)

RATE_WINDOW = 60  # seconds over which messages per second is averaged
# The same words as README.md's, for an installed package and for a clone.
MISSING_EXTRA = (
    "metrics_port needs prometheus-client: pip install 'chatd[metrics]'"
    " (in a clone: pip install -e '.[metrics]')"
)


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started_at = clock()
        self.connections = 0
        self.requests = 0
        self.messages_stored = 0
        self.pushes_sent = 0
        self.disconnects: Counter[str] = Counter()
        self._per_second: deque[list[int]] = deque()  # [second, messages stored in it]

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self, reason: str) -> None:
        self.connections -= 1
        self.disconnects[reason] += 1

    def request_handled(self, op: str, code: int, seconds: float, count: int = 1) -> None:
        """``count`` requests of ``op`` answered with ``code`` (the sends of one read are
        counted together), ``seconds`` after they were read."""
        self.requests += count

    def message_stored(self, kind: str, count: int = 1) -> None:
        self.messages_stored += count
        second = int(self._clock())
        per_second = self._per_second
        if per_second and per_second[-1][0] == second:
            per_second[-1][1] += count
            return  # what fell out of the window went when this second's entry was made
        per_second.append([second, count])
        while per_second[0][0] <= second - RATE_WINDOW:
            per_second.popleft()

    def pushed(self, count: int = 1) -> None:
        self.pushes_sent += count

    @property
    def uptime(self) -> float:
        return self._clock() - self.started_at

    def messages_per_second(self) -> float:
        now = int(self._clock())
        recent = sum(count for second, count in self._per_second if second > now - RATE_WINDOW)
        return recent / min(RATE_WINDOW, max(self.uptime, 1.0))

    def watch_disk(self, disk_full: Callable[[], bool]) -> None:
        """Where to read whether writes fail for want of disk space (the store knows)."""

    def serve(self, host: str, port: int) -> None:
        raise RuntimeError(MISSING_EXTRA)

    def close(self) -> None:
        pass


class PrometheusMetrics(Metrics):
    def __init__(
        self, known_ops: Collection[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(clock)
        import prometheus_client as prom

        self._known_ops = frozenset(known_ops)
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self._server: Any = None
        self._connections = prom.Gauge(
            "chatd_connections", "Open client connections", registry=self.registry
        )
        self._requests = prom.Counter(
            "chatd_requests", "Requests handled", ["op", "code"], registry=self.registry
        )
        self._latency = prom.Histogram(
            "chatd_request_seconds", "Time to handle a request", ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self._messages = prom.Counter(
            "chatd_messages_stored", "Messages stored", ["kind"], registry=self.registry
        )
        self._pushes = prom.Counter(
            "chatd_pushes_sent", "Events pushed to clients", registry=self.registry
        )
        self._disconnects = prom.Counter(
            "chatd_disconnects", "Connections closed", ["reason"], registry=self.registry
        )
        self._disk_full = prom.Gauge(
            "chatd_disk_full",
            "1 while database writes fail for want of disk space",
            registry=self.registry,
        )

    def connection_opened(self) -> None:
        super().connection_opened()
        self._connections.inc()

    def connection_closed(self, reason: str) -> None:
        super().connection_closed(reason)
        self._connections.dec()
        self._disconnects.labels(reason).inc()

    def request_handled(self, op: str, code: int, seconds: float, count: int = 1) -> None:
        super().request_handled(op, code, seconds, count)
        op = op if op in self._known_ops else "unknown"  # clients must not mint label values
        self._requests.labels(op, str(code)).inc(count)
        latency = self._latency.labels(op)
        for _ in range(count):  # each request's own observation
            latency.observe(seconds)

    def message_stored(self, kind: str, count: int = 1) -> None:
        super().message_stored(kind, count)
        self._messages.labels(kind).inc(count)

    def pushed(self, count: int = 1) -> None:
        super().pushed(count)
        self._pushes.inc(count)

    def watch_disk(self, disk_full: Callable[[], bool]) -> None:
        self._disk_full.set_function(lambda: float(disk_full()))

    def serve(self, host: str, port: int) -> None:
        self._server, _ = self._prom.start_http_server(port, addr=host, registry=self.registry)
        # Logged like the listening address, so an operator sees where to point Prometheus.
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", shown, self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def create(enabled: bool, known_ops: Collection[str]) -> Metrics:
    """Prometheus-backed when an endpoint is wanted (needs the extra), plain otherwise."""
    if not enabled:
        return Metrics()
    try:
        return PrometheusMetrics(known_ops)
    except ImportError:
        raise RuntimeError(MISSING_EXTRA) from None
