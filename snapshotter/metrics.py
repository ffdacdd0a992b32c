"""Prometheus metrics of the snapshotter (served on ``[metrics] address``).

* ``snapshotter_snapshot_operation_elapsed_seconds{op}`` — histogram of call latencies;
* ``snapshotter_snapshot_operations_total{op,outcome}`` — calls by result (ok / gRPC code name);
* ``snapshotter_snapshots{kind}`` — snapshots in the metastore;
* ``snapshotter_rafs_instances`` — mounted RAFS instances; ``snapshotter_daemon_states{state}``;
* ``snapshotter_cache_usage_bytes`` — allocated bytes in the blob cache dir;
* ``snapshotter_backend_read_bytes{daemon}`` — bytes the RAFS daemons' mounted instances read
  from the registry (``nydus_storage_backend_read_bytes_total`` of each live daemon);
* ``snapshotter_daemon_failovers_total{outcome}`` — dead daemons replaced under
  ``recover_policy = "failover"`` and hot upgrades (``upgraded``; ``ok``: the successor adopted the FUSE session; ``restarted``:
  it could not and the daemon was restarted, its mounts lost);
* ``snapshotter_daemon_failover_elapsed_seconds`` — histogram of ``ok`` failovers, from noticing
  the death to the successor RUNNING (readers of the mount wait in the kernel meanwhile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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
        backend = GaugeMetricFamily("snapshotter_backend_read_bytes",
                                    "Bytes read from the backend by the mounted RAFS instances, per daemon",
                                    labels=["daemon"])
        mgr = self.sn.rafs.manager_if_started
        if mgr is not None:
            counts: dict[str, int] = {}
            daemons: dict[str, str] = {}  # daemon id -> one of its instance ids
            try:
                for iid, st in mgr.instances().items():
                    name = str(getattr(st, "state", st))
                    counts[name] = counts.get(name, 0) + 1
                    if name != "DEAD" and hasattr(st, "daemon_id"):
                        daemons.setdefault(st.daemon_id, iid)
            except Exception:  # noqa: BLE001 - metrics must never fail the scrape
                counts = {"unknown": len(self.sn.instances())}
            for name, n in counts.items():
                states.add_metric([name], n)
            for daemon_id, iid in sorted(daemons.items()):
                n = _backend_bytes(mgr, iid)
                if n is not None:
                    backend.add_metric([daemon_id], n)
        yield states
        yield backend
        yield from _failover_metrics(mgr)
        yield from _renewal_metrics(self.sn)
        yield GaugeMetricFamily("snapshotter_cache_usage_bytes", "Allocated bytes of the blob cache",
                                value=self.sn.cache_size())


def _renewal_metrics(sn: "Snapshotter") -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Upstream's credential renewal series (``[remote.auth] credential_renewal_interval``)."""
    renewal = getattr(sn, "renewal", None)
    if renewal is None:
        return
    counts, tracked = renewal.snapshot()
    renewals = CounterMetricFamily("snapshotter_credential_renewals",
                                   "Credential renewal attempts by image ref and result (success or failure)",
                                   labels=["image_ref", "result"])
    for (ref, result), n in sorted(counts.items()):
        renewals.add_metric([ref, result], n)
    yield renewals
    entries = GaugeMetricFamily("snapshotter_credential_store_entries",
                                "Credentials tracked for renewal per image ref", labels=["image_ref"])
    for ref in sorted(tracked):
        entries.add_metric([ref], 1)
    yield entries


FAILOVER_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30)


def _failover_metrics(mgr: object) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    counter = CounterMetricFamily("snapshotter_daemon_failovers", "Dead nydusd daemons failed over, by outcome",
                                  labels=["outcome"])
    stats = getattr(mgr, "failovers", None)
    counts, durations, total = {}, [], 0.0
    if stats is not None:
        counts, durations, total, _ = stats.snapshot()
    for outcome in ("ok", "restarted", "upgraded"):
        counter.add_metric([outcome], counts.get(outcome, 0))
    yield counter
    buckets = [(str(float(le)), sum(d <= le for d in durations)) for le in FAILOVER_BUCKETS]
    buckets.append(("+Inf", len(durations)))
    hist = HistogramMetricFamily("snapshotter_daemon_failover_elapsed_seconds",
                                 "Time from a daemon's death to its successor serving the held FUSE session")
    hist.add_metric([], buckets, total)
    yield hist


def _backend_bytes(mgr: object, instance_id: str) -> float | None:
    """``nydus_storage_backend_read_bytes_total`` summed over the daemon serving ``instance_id``."""
    try:
        text = mgr.daemon_client(instance_id).metrics()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a daemon that does not answer has no figure
        return None
    total = 0.0
    for line in str(text).splitlines():
        if line.startswith("nydus_storage_backend_read_bytes_total"):
            try:
                total += float(line.rsplit(None, 1)[1])
            except (IndexError, ValueError):
                continue
    return total


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
