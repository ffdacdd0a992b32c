"""Prometheus metrics of the snapshotter (served on ``[metrics] address``).

* ``snapshotter_snapshot_operation_elapsed_seconds{op}`` — histogram of call latencies;
* ``snapshotter_snapshot_operations_total{op,outcome}`` — calls by result (ok / gRPC code name);
* ``snapshotter_snapshots{kind}`` — snapshots in the metastore;
* ``snapshotter_rafs_instances`` — mounted RAFS instances; ``snapshotter_daemon_states{state}``;
* ``snapshotter_cache_usage_bytes`` — allocated bytes in the blob cache dir.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from snapshotter.snapshot import Snapshotter

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StateCollector(Collector):
    def __init__(self, sn: "Snapshotter") -> None:
        self.sn = sn

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snaps = GaugeMetricFamily("snapshotter_snapshots", "Snapshots in the metastore", labels=["kind"])
        for kind, n in self.sn.counts().items():
            snaps.add_metric([kind], n)
        yield snaps
        yield GaugeMetricFamily("snapshotter_rafs_instances", "Mounted RAFS instances",
                                value=len(self.sn.instances()))
        states = GaugeMetricFamily("snapshotter_daemon_states", "RAFS instances by daemon state", labels=["state"])
        mgr = self.sn._manager
        if mgr is not None:
            counts: dict[str, int] = {}
            try:
                for st in mgr.instances().values():
                    name = str(getattr(st, "state", st))
                    counts[name] = counts.get(name, 0) + 1
            except Exception:  # noqa: BLE001 - metrics must never fail the scrape
                counts = {"unknown": len(self.sn.instances())}
            for name, n in counts.items():
                states.add_metric([name], n)
        yield states
        yield GaugeMetricFamily("snapshotter_cache_usage_bytes", "Allocated bytes of the blob cache",
                                value=self.sn.cache_size())


class Metrics:
    """The registry plus the ``observe(op, seconds, outcome)`` hook the gRPC service calls."""

    def __init__(self, sn: "Snapshotter") -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("snapshotter_snapshot_operation_elapsed_seconds", "Snapshot call latency",
                                 ["op"], registry=self.registry, buckets=BUCKETS)
        self.calls = Counter("snapshotter_snapshot_operations", "Snapshot calls by outcome", ["op", "outcome"],
                             registry=self.registry)
        self.registry.register(_StateCollector(sn))
        self._server = None

    def observe(self, op: str, seconds: float, outcome: str) -> None:
        self.latency.labels(op).observe(seconds)
        self.calls.labels(op, outcome).inc()

    def serve(self, address: str) -> tuple[str, int]:
        """Start the HTTP endpoint on ``host:port`` (port 0 = any); returns the bound address."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
