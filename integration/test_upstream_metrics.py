"""Upstream nydus-snapshotter's Prometheus series on the snapshotter's endpoint, through the real
stack (registry, containerd, runc, nydusd under FUSE / kernel EROFS): a container reads a nydus
image lazily, the scrape is parsed with ``prometheus_client``'s own parser, and upstream's
families are there with upstream's names, types, units and labels (``image_ref`` the image the
container runs), with values that follow what the container did."""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from integration.conftest import snapshotter_config_for
from integration.snapshotter_support import busybox_nydus_image, wait_for
from integration.test_snapshotter_containerd import SNAPSHOTTER, kill_recorded_daemons

pytestmark = [pytest.mark.containerd, pytest.mark.root, pytest.mark.timeout(300)]

#: upstream's families (pkg/metrics/data/*.go) and their types as the parser reports them
UPSTREAM = {
    "snapshotter_snapshot_operation_elapsed_milliseconds": "histogram",
    "snapshotter_cache_usage_kilobytes": "gauge",
    "snapshotter_cpu_usage_percentage": "gauge",
    "snapshotter_memory_usage_kilobytes": "gauge",
    "snapshotter_cpu_system_time_seconds": "gauge",
    "snapshotter_cpu_user_time_seconds": "gauge",
    "snapshotter_fd_counts": "gauge",
    "snapshotter_run_time_seconds": "gauge",
    "snapshotter_thread_counts": "gauge",
    "snapshotter_cache_blobs_deleted": "counter",
    "snapshotter_cache_blobs_in_use": "gauge",
    "snapshotter_cache_blob_deletion_errors": "counter",
    "snapshotter_credential_renewals": "counter",
    "snapshotter_credential_store_entries": "gauge",
    "nydusd_lifetime_event_counts": "unknown",  # upstream: a counter without _total
    "nydusd_counts": "gauge",
    "nydusd_rss_kilobytes": "gauge",
    "nydusd_image_info": "gauge",
    "nydusd_total_read_bytes": "gauge",
    "nydusd_read_hits": "gauge",
    "nydusd_read_errors": "gauge",
    "nydusd_hung_io_counts": "gauge",
    "nydusd_cumulative_read_block_bytes": "histogram",
    "nydusd_read_latency_microseconds": "histogram",
    "nydusd_cache_partial_hits": "gauge",
    "nydusd_cache_whole_hits": "gauge",
    "nydusd_cache_total_requests": "gauge",
    "nydusd_cache_entries_count": "gauge",
    "nydusd_cache_prefetch_data_bytes": "gauge",
    "nydusd_cache_prefetch_requests_count": "gauge",
    "nydusd_cache_prefetch_workers": "gauge",
    "nydusd_cache_prefetch_unmerged_chunks": "gauge",
    "nydusd_cache_prefetch_cumulative_time_millis": "gauge",
    "nydusd_cache_prefetch_duration_millis": "gauge",
    "nydusd_cache_buffered_backend_size": "gauge",
}


def _image(tmp: pathlib.Path):
    rnd = random.Random(16)
    files = {f"data/f{i}": rnd.randbytes(700_000) for i in range(4)}
    img = busybox_nydus_image(tmp, files, ("sh", "md5sum", "sleep", "cat"))
    return img, {"/" + k: hashlib.md5(v).hexdigest() for k, v in files.items()}


@pytest.mark.parametrize("fs_driver", ["fusedev", "erofs"])
def test_scrape_has_upstream_series_for_a_running_nydus_container(registry, snapshotter_factory,
                                                                  containerd_factory, tmp_path, fs_driver):
    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox missing (Debian package busybox-static)")
    cfg = snapshotter_config_for(registry, prefetch=False)
    cfg["daemon"] = {"fs_driver": fs_driver}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg["metrics"] = {"address": f"127.0.0.1:{port}"}
    sn = snapshotter_factory(config=cfg)
    cd = containerd_factory(snapshotters={SNAPSHOTTER: sn.address}, cri_snapshotter=SNAPSHOTTER,
                            registries=[registry])
    try:
        img, sums = _image(tmp_path)
        image = img.push(registry, "test/metrics", fs_driver)
        cd.cri.pull_image(image.ref)
        script = "md5sum /data/f0 /data/f1 /data/f0 > /sums; sleep 30"
        t = threading.Thread(target=lambda: cd.run(image.ref, ["/bin/sh", "-c", script], snapshotter=SNAPSHOTTER,
                                                   namespace="k8s.io", check=False, timeout=120), daemon=True)
        t.start()
        wait_for(lambda: [p for p in pathlib.Path(sn.root, "snapshots").glob("*/fs/sums") if p.stat().st_size],
                 60, "the container to read its files")
        written = next(p for p in pathlib.Path(sn.root, "snapshots").glob("*/fs/sums") if p.stat().st_size)
        assert {line.split()[1]: line.split()[0] for line in written.read_text().splitlines()} == \
            {k: sums[k] for k in ("/data/f0", "/data/f1")}

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        missing = {name for name in UPSTREAM if name not in families}
        assert not missing, missing
        wrong = {name: families[name].type for name, kind in UPSTREAM.items() if families[name].type != kind}
        assert not wrong, wrong

        def samples(name: str, suffix: str = "") -> dict[tuple, float]:
            return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples
                    if s.name == name + suffix}

        ref = image.ref
        assert samples("nydusd_image_info")[(("daemon_id", f"shared-{fs_driver}"), ("image_ref", ref))] == 1
        read_bytes = samples("nydusd_total_read_bytes").get((("image_ref", ref),), 0)
        if fs_driver == "fusedev":
            # the container read f0 twice and f1 once through FUSE (the page cache answers the
            # second f0 read, and busybox itself was read too): at least the two files
            assert read_bytes >= 2 * 700_000, body
            assert samples("nydusd_read_hits")[(("image_ref", ref),)] > 0
        # the distributions count every read the daemon served (one scrape, one FsMetric)
        hits = samples("nydusd_read_hits").get((("image_ref", ref),), 0)
        assert samples("nydusd_read_latency_microseconds", "_count")[(("image_ref", ref),)] == hits, body
        assert samples("nydusd_cumulative_read_block_bytes", "_count")[(("image_ref", ref),)] == hits, body
        cache_total = samples("nydusd_cache_total_requests")[(("image_ref", ref),)]
        assert cache_total > 0 and samples("nydusd_cache_entries_count")[(("image_ref", ref),)] > 0, body
        assert samples("nydusd_read_errors").get((("image_ref", ref),), 0) == 0
        assert samples("nydusd_lifetime_event_counts")[(("nydusd_event", "RUNNING"),)] >= 1
        assert sum(samples("nydusd_counts").values()) == 1
        assert samples("nydusd_rss_kilobytes")[(("daemon_id", f"shared-{fs_driver}"),)] > 10_000
        ops = samples("snapshotter_snapshot_operation_elapsed_milliseconds", "_count")
        assert ops[(("snapshot_operation", "PREPARE"),)] >= 1 and ops[(("snapshot_operation", "MOUNTS"),)] >= 0
        assert samples("snapshotter_cache_usage_kilobytes")[()] > 0
        assert samples("snapshotter_memory_usage_kilobytes")[()] > 10_000
        assert samples("snapshotter_fd_counts")[()] > 3 and samples("snapshotter_thread_counts")[()] >= 2
        assert samples("snapshotter_run_time_seconds")[()] > 0
        assert samples("snapshotter_cache_blobs_in_use")[()] >= 1
        assert "process_resident_memory_bytes" in families  # prometheus_client's process collector
        # the exposition names are upstream's, counters included
        for line in ("\nnydusd_lifetime_event_counts{nydusd_event=\"RUNNING\"} ",
                     "\nsnapshotter_cache_blobs_deleted_total ", "\nnydusd_cache_whole_hits{image_ref="):
            assert line in body, line
    finally:
        cd.stop()
        sn.terminate()
        kill_recorded_daemons(sn.root)
