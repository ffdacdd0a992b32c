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

Upstream nydus-snapshotter's series, same names, units and labels (:class:`_UpstreamCollector`;
the list is in docs/operators.md §10): ``snapshotter_snapshot_operation_elapsed_milliseconds``,
``snapshotter_cache_usage_kilobytes``, the process gauges, cache GC and credential renewal
counters, and per daemon / per image (``image_ref``) the ``nydusd_*`` filesystem and cache series.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, UnknownMetricFamily
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


#: upstream's ``snapshotter_snapshot_operation_elapsed_milliseconds`` buckets (ms)
UPSTREAM_MS_BUCKETS = (.5, 1, 5, 10, 50, 100, 150, 200, 250, 300, 350, 400, 600, 1000)
#: upstream's FsMetric histograms: ``block_count_read`` (KiB size classes) and
#: ``read_latency_dist`` (µs classes), each 8 counters, as upstream turns them into histograms
FS_HISTOGRAMS = (
    ("nydusd_cumulative_read_block_bytes", "Cumulative read size histogram for different block size, in bytes.",
     "block_count_read", (1, 4, 16, 64, 128, 512, 1024, 2048)),
    ("nydusd_read_latency_microseconds", "Read latency histogram, in microseconds",
     "read_latency_dist", (1, 20, 50, 100, 500, 1000, 2000, 4000)),
)
#: upstream's nydusd_cache_* gauges ← BlobcacheMetrics fields
CACHE_GAUGES = (
    ("nydusd_cache_partial_hits", "Number of partial cache hits (IO needs a part of the chunk)", "partial_hits"),
    ("nydusd_cache_whole_hits", "Number of whole cache hits (IO needs the entire chunk)", "whole_hits"),
    ("nydusd_cache_total_requests", "Total number of cache read requests", "total"),
    ("nydusd_cache_entries_count", "Number of chunks in ready status", "entries_count"),
    ("nydusd_cache_prefetch_data_bytes", "Total amount of data prefetched, in bytes", "prefetch_data_amount"),
    ("nydusd_cache_prefetch_requests_count", "Total prefetch requests", "prefetch_requests_count"),
    ("nydusd_cache_prefetch_workers", "Number of prefetch workers", "prefetch_workers"),
    ("nydusd_cache_prefetch_unmerged_chunks", "Number of unmerged chunks", "prefetch_unmerged_chunks"),
    ("nydusd_cache_prefetch_cumulative_time_millis", "Cumulative time latencies in milliseconds of each "
     "prefetch request", "prefetch_cumulative_time_millis"),
    ("nydusd_cache_prefetch_duration_millis", "Total wall clock duration of the prefetch, in milliseconds", None),
    ("nydusd_cache_buffered_backend_size", "Size of the buffered backend, in bytes", "buffered_backend_size"),
)


def _proc_status(pid: int | str) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        pass
    return out


def _kib(value: str) -> float:
    """``/proc/<pid>/status``'s ``12345 kB`` → 12345."""
    try:
        return float(value.split()[0])
    except (IndexError, ValueError):
        return 0.0


class _ProcessUsage:
    """upstream's snapshotter resource gauges, from ``/proc/self``: CPU seconds and percentage
    since the previous scrape (upstream: since the previous collection), RSS, fds, threads, run time."""

    def __init__(self) -> None:
        self._last: tuple[float, float, float] | None = None  # (utime, stime, monotonic)
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        times = os.times()
        now = time.monotonic()
        with self._lock:
            last, self._last = self._last, (times.user, times.system, now)
        usr = times.user - last[0] if last else 0.0
        sys_ = times.system - last[1] if last else 0.0
        wall = now - last[2] if last else 0.0
        status = _proc_status("self")
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = 0
        try:
            with open("/proc/self/stat", encoding="ascii") as f:
                start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/uptime", encoding="ascii") as f:
                uptime = float(f.read().split()[0])
            run_time = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            run_time = 0.0
        for name, help_text, value in (
                ("snapshotter_cpu_usage_percentage", "CPU usage percentage of snapshotter.",
                 round(100.0 * (usr + sys_) / wall, 2) if wall > 0 else 0.0),
                ("snapshotter_memory_usage_kilobytes", "Memory usage (RSS) of snapshotter.", _kib(status.get("VmRSS", ""))),
                ("snapshotter_cpu_system_time_seconds", "CPU time of snapshotter in system.", round(sys_, 2)),
                ("snapshotter_cpu_user_time_seconds", "CPU time of snapshotter in user.", round(usr, 2)),
                ("snapshotter_fd_counts", "Fd counts of snapshotter.", fds),
                ("snapshotter_run_time_seconds", "Running time of snapshotter from starting.", round(run_time, 2)),
                ("snapshotter_thread_counts", "Thread counts of snapshotter.", float(status.get("Threads", 0) or 0))):
            yield GaugeMetricFamily(name, help_text, value=value)


class _UpstreamCollector(Collector):
    """Upstream nydus-snapshotter's series on the same endpoint, same names, units and labels:
    the snapshotter's own (cache usage in KiB, resource usage, cache blob GC) and, per mounted
    image (``image_ref``), its daemon's filesystem and cache counters read from the daemon's API
    at scrape time (upstream reads them every ``collect_interval``), plus the daemons' lifetime
    events, versions, RSS and image mapping."""

    def __init__(self, sn: "Snapshotter") -> None:
        self.sn = sn
        self.process = _ProcessUsage()

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("snapshotter_cache_usage_kilobytes", "Disk usage of snapshotter local cache.",
                                value=self.sn.cache_size() / 1024)
        yield from self.process.collect()
        yield CounterMetricFamily("snapshotter_cache_blobs_deleted", "Total number of cache blobs deleted during cleanup.",
                                  value=getattr(self.sn, "gc_deleted", 0))
        yield CounterMetricFamily("snapshotter_cache_blob_deletion_errors",
                                  "Total number of errors encountered while deleting cache blobs.",
                                  value=getattr(self.sn, "gc_errors", 0))
        try:
            in_use = len(self.sn.blobs_in_use())
        except Exception:  # noqa: BLE001 - metrics must never fail the scrape
            in_use = 0
        yield GaugeMetricFamily("snapshotter_cache_blobs_in_use",
                                "Number of cache blobs currently in use by running daemons.", value=in_use)
        yield from self._daemons()

    def _daemons(self) -> Iterator[Any]:
        from rafs.daemon.client import DaemonClient  # noqa: PLC0415 - only with a manager

        # upstream's is a Go counter named without "_total"; prometheus_client writes every counter
        # as <name>_total, so it is untyped here: the series keeps upstream's exact name
        events = UnknownMetricFamily("nydusd_lifetime_event_counts", "The lifetime events of nydus daemon.",
                                     labels=["nydusd_event"])
        counts = GaugeMetricFamily("nydusd_counts", "The counts of nydus daemon.", labels=["version"])
        rss = GaugeMetricFamily("nydusd_rss_kilobytes", "Memory usage (RSS) of nydus daemon.", labels=["daemon_id"])
        images = GaugeMetricFamily("nydusd_image_info", "Mapping of nydus daemon to served image references.",
                                   labels=["daemon_id", "image_ref"])
        fs = {name: GaugeMetricFamily(name, help_text, labels=["image_ref"]) for name, help_text in (
            ("nydusd_total_read_bytes", "Total bytes read against the nydus filesystem"),
            ("nydusd_read_hits", "Total number of successful read operations."),
            ("nydusd_read_errors", "Total number of failed read operations."))}
        hists = [HistogramMetricFamily(name, help_text, labels=["image_ref"]) for name, help_text, _, _ in FS_HISTOGRAMS]
        cache = [GaugeMetricFamily(name, help_text, labels=["image_ref"]) for name, help_text, _ in CACHE_GAUGES]
        hung = 0
        hung_after = self.sn.config.metrics.hung_io_seconds
        mgr = self.sn.rafs.manager_if_started
        daemons = []
        if mgr is not None:
            for name, n in sorted(getattr(mgr, "events", {}).items()):
                events.add_metric([name], n)
            try:
                daemons = list(mgr.daemons())
                refs = self.sn.instance_refs()
            except Exception:  # noqa: BLE001
                daemons, refs = [], {}
        versions: dict[str, int] = {}
        now = time.time()
        for rec in daemons:
            client = DaemonClient(rec.apisock, timeout=2)
            try:
                info = client.info()
            except Exception:  # noqa: BLE001 - a dead daemon has no figures
                continue
            version = str((info.get("version") or {}).get("package_ver", ""))
            versions[version] = versions.get(version, 0) + 1
            if rec.pid > 0:
                rss.add_metric([rec.daemon_id], _kib(_proc_status(rec.pid).get("VmRSS", "")))
            try:
                hung += sum(1 for op in (client.request("GET", "/api/v1/metrics/inflight") or [])
                            if now - float(op.get("timestamp_secs", now)) >= hung_after)
            except Exception:  # noqa: BLE001 - libfuse's loop does not say
                pass
            for iid in sorted(rec.instances):
                ref = refs.get(iid)
                if ref is None:
                    continue
                images.add_metric([rec.daemon_id, ref], 1)
                query = urllib.parse.urlencode({"id": "/" + iid if rec.shared else "/"})
                try:
                    m = client.request("GET", f"/api/v1/metrics?{query}")
                except Exception:  # noqa: BLE001
                    continue
                fs["nydusd_total_read_bytes"].add_metric([ref], m.get("data_read", 0))
                fs["nydusd_read_hits"].add_metric([ref], (m.get("fop_hits") or [0] * 5)[4])
                fs["nydusd_read_errors"].add_metric([ref], (m.get("fop_errors") or [0] * 5)[4])
                for hist, (_, _, field_name, bounds) in zip(hists, FS_HISTOGRAMS):
                    counters = list(m.get(field_name) or [0] * len(bounds))[:len(bounds)]
                    running, total, buckets = 0, 0, []
                    for bound, c in zip(bounds, counters):
                        running += c
                        total += bound * c
                        buckets.append((str(float(bound)), running))
                    buckets.append(("+Inf", running))
                    hist.add_metric([ref], buckets, total)
                try:
                    c = client.request("GET", f"/api/v1/metrics/blobcache?{query}")
                except Exception:  # noqa: BLE001 - no file cache: upstream has no figures either
                    continue
                for family, (_, _, field_name) in zip(cache, CACHE_GAUGES):
                    if field_name is None:  # the prefetch's wall-clock duration
                        begin = c.get("prefetch_begin_time_secs", 0) * 1000 + c.get("prefetch_begin_time_millis", 0)
                        end = c.get("prefetch_end_time_secs", 0) * 1000 + c.get("prefetch_end_time_millis", 0)
                        family.add_metric([ref], max(0, end - begin) if begin else 0)
                    else:
                        family.add_metric([ref], c.get(field_name, 0))
        for version, n in sorted(versions.items()):
            counts.add_metric([version], n)
        yield events
        yield counts
        yield rss
        yield images
        yield from fs.values()
        yield from hists
        yield from cache
        yield GaugeMetricFamily("nydusd_hung_io_counts", "Total number of hung IOs.", value=hung)


class Metrics:
    """The registry plus the ``observe(op, seconds, outcome)`` hook the gRPC service calls."""

    def __init__(self, sn: "Snapshotter") -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("snapshotter_snapshot_operation_elapsed_seconds", "Snapshot call latency",
                                 ["op"], registry=self.registry, buckets=BUCKETS)
        self.calls = Counter("snapshotter_snapshot_operations", "Snapshot calls by outcome", ["op", "outcome"],
                             registry=self.registry)
        #: upstream's: milliseconds, label ``snapshot_operation`` with the call in capitals (upstream
        #: times PREPARE, MOUNTS, CLEANUP and REMOVE; every call is timed here)
        self.upstream_latency = Histogram("snapshotter_snapshot_operation_elapsed_milliseconds",
                                          "The elapsed time for snapshot events.", ["snapshot_operation"],
                                          registry=self.registry, buckets=UPSTREAM_MS_BUCKETS)
        self.registry.register(_StateCollector(sn))
        self.registry.register(_UpstreamCollector(sn))
        ProcessCollector(registry=self.registry)  # process_* (CPU, RSS, fds, start time)
        self._server = None

    def observe(self, op: str, seconds: float, outcome: str) -> None:
        self.latency.labels(op).observe(seconds)
        self.calls.labels(op, outcome).inc()
        self.upstream_latency.labels(op.upper()).observe(seconds * 1000)

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
