"""The failover metrics the snapshotter exports from its DaemonManager's FailoverStats."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from rafs.daemon.manager import FailoverEvent, FailoverStats
from snapshotter.metrics import _failover_metrics


class _Mgr:
    def __init__(self) -> None:
        self.failovers = FailoverStats()


def _text(mgr) -> str:
    reg = CollectorRegistry()

    class C:
        def collect(self):
            return _failover_metrics(mgr)

    reg.register(C())
    return generate_latest(reg).decode()


def test_failover_counts_and_durations():
    mgr = _Mgr()
    assert 'snapshotter_daemon_failovers_total{outcome="ok"} 0.0' in _text(mgr)
    mgr.failovers.record(FailoverEvent("shared-fusedev", 10, 11, 0.4, "ok", 0.0))
    mgr.failovers.record(FailoverEvent("shared-fusedev", 11, 12, 3.0, "ok", 0.0))
    mgr.failovers.record(FailoverEvent("shared-fusedev", 12, 13, 9.0, "restarted", 0.0))
    text = _text(mgr)
    assert 'snapshotter_daemon_failovers_total{outcome="ok"} 2.0' in text
    assert 'snapshotter_daemon_failovers_total{outcome="restarted"} 1.0' in text
    assert 'snapshotter_daemon_failover_elapsed_seconds_bucket{le="0.5"} 1.0' in text
    assert 'snapshotter_daemon_failover_elapsed_seconds_bucket{le="+Inf"} 2.0' in text
    assert "snapshotter_daemon_failover_elapsed_seconds_count 2.0" in text
    assert "snapshotter_daemon_failover_elapsed_seconds_sum 3.4" in text
    assert 'snapshotter_daemon_failovers_total{outcome="ok"} 0.0' in _text(object())  # no manager yet
