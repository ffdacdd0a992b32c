"""The daemon API answers upstream nydusd's v1 JSON shapes (golden field/type list in
tests/data/upstream/api_v1_shapes.json) on a real FUSE mount, and keeps the Prometheus text."""

from __future__ import annotations

import json
import logging
import os
import socket

from tests.fs_harness import require_fuse, running_daemon

SHAPES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "upstream", "api_v1_shapes.json")))
TYPES = {"str": str, "bool": bool, "int": int, "list": list, "object": dict}


def _check(obj: dict, shape: str) -> None:
    for field, kind in SHAPES[shape].items():
        assert field in obj, (shape, field, obj)
        assert isinstance(obj[field], TYPES[kind]), (shape, field, obj[field])


def _call(sock_path: str, method: str, target: str, body: bytes = b"", accept: str = "") -> tuple[int, str, bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sock_path)
    extra = f"Accept: {accept}\r\n" if accept else ""
    s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    s.close()
    head, _, payload = buf.partition(b"\r\n\r\n")
    ctype = [h.split(b":", 1)[1].strip().decode() for h in head.split(b"\r\n")
             if h.lower().startswith(b"content-type:")][0]
    return int(head.split(b" ", 2)[1]), ctype, payload


def test_upstream_v1_shapes_on_a_real_mount(tmp_path):
    require_fuse()
    from rafs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hello upstream" * 100)
    (tmp_path / "blobs").mkdir()
    boot = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(tmp_path / "blobs"),
                 options=BuildOptions()).bootstrap
    config = {"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
                         "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}}}
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        sock = client.apisock
        client.mount("/a", boot, config)
        assert open(os.path.join(mnt, "a", "f"), "rb").read() == b"hello upstream" * 100

        status, ctype, body = _call(sock, "GET", "/api/v1/daemon")
        info = json.loads(body)
        assert status == 200 and "json" in ctype
        _check(info, "DaemonInfo")
        _check(info["version"], "BuildTimeInfo")
        assert info["state"] == "RUNNING" and "supervisor" in info and "/a" in info["instances"]

        status, ctype, body = _call(sock, "GET", "/api/v1/metrics?id=/a")
        metric = json.loads(body)
        assert status == 200 and "json" in ctype
        _check(metric, "FsMetric")
        assert metric["id"] == "/a" and metric["data_read"] >= 1400
        assert len(metric["fop_hits"]) == 15 and metric["fop_hits"][4] >= 1  # StatsFop::Read
        reads = metric["fop_hits"][4] + metric["fop_errors"][4]
        assert metric["measure_latency"] is True and len(metric["read_latency_dist"]) == 8
        assert sum(metric["block_count_read"]) == reads and sum(metric["read_latency_dist"]) == reads
        assert sum(metric["block_count_read"][1:3]) >= 1  # the 1400-byte file: one read, 1-4 KiB class
        assert metric["fop_hits"][9] >= 1  # Lookup, counted by the FUSE loop

        status, _, body = _call(sock, "GET", "/api/v1/metrics")  # global: summed, id ""
        total = json.loads(body)
        _check(total, "FsMetric")
        assert status == 200 and total["id"] == "" and total["data_read"] == metric["data_read"]
        assert (total["block_count_read"], total["read_latency_dist"]) == (metric["block_count_read"],
                                                                          metric["read_latency_dist"])

        status, _, body = _call(sock, "GET", "/api/v1/metrics?id=/nope")
        assert status == 404
        _check(json.loads(body), "ErrorMessage")

        # Prometheus text where it was: Accept text/plain, ?format=prometheus, and our client
        for target, accept in (("/api/v1/metrics", "text/plain"), ("/api/v1/metrics?format=prometheus", "")):
            status, ctype, body = _call(sock, "GET", target, accept=accept)
            assert status == 200 and ctype.startswith("text/plain") and b"nydusd_read_count" in body
        assert "nydusd_read_count" in client.metrics()

        # upstream: the instance's RafsSuperMeta; 'mountpoint' is required
        status, _, body = _call(sock, "GET", "/api/v1/daemon/backend")
        assert status == 400 and "'mountpoint' should be specified" in json.loads(body)["message"]
        status, _, body = _call(sock, "GET", "/api/v1/daemon/backend?mountpoint=/a")
        meta = json.loads(body)
        assert status == 200
        _check(meta, "RafsSuperMeta")
        assert meta["version"] == 0x600 and meta["magic"] == 0xE0F5E1E2 and meta["inodes_count"] == 2
        assert meta["flags"] == {"bits": meta["flags"]["bits"]} and meta["flags"]["bits"] > 0
        assert meta["attr_timeout"] == {"secs": 1 << 32, "nanos": 0} and meta["chunk_size"] == 1 << 20
        assert _call(sock, "GET", "/api/v1/daemon/backend?mountpoint=/nope")[0] == 404

        status, _, _ = _call(sock, "PUT", "/api/v1/daemon", b'{"log_level": "debug"}')
        assert status == 204
        status, _, body = _call(sock, "PUT", "/api/v1/daemon", b'{"log_level": "loud"}')
        assert status == 400 and "log_level" in json.loads(body)["message"]
        client.umount("/a")

        # upstream nydusctl's commands against the same daemon
        from snapshotter import ctl

        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(config))
        assert ctl.main(["-S", sock, "mount", "-s", boot, "-c", str(cfg), "-m", "/b"]) == 0
        assert open(os.path.join(mnt, "b", "f"), "rb").read() == b"hello upstream" * 100
        assert ctl.main(["-S", sock, "set", "log-level", "info"]) == 0
        assert ctl.main(["--sock", sock, "metrics", "--id", "/b"]) == 0
        assert ctl.main(["-S", sock, "info"]) == 0
        assert ctl.main(["-S", sock, "umount", "-m", "/b"]) == 0
        assert client.info()["instances"] == {}
        assert ctl.main(["-S", sock, "umount", "-m", "/b"]) == 1  # the daemon's 404, one line


def test_set_log_level_changes_the_root_logger():
    from rafs.daemon.api import set_log_level

    root = logging.getLogger()
    old = root.level
    try:
        set_log_level("warn")
        assert root.level == logging.WARNING
        set_log_level("DEBUG")
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(old)


def test_nydusctl_daemon_commands_need_a_socket(capsys):
    from snapshotter import ctl

    assert ctl.main(["info"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-S/--sock" in err


V2_SAMPLE = os.path.join(os.path.dirname(__file__), "data", "upstream", "nydusd-config-v2.toml")


def test_upstream_v2_sample_loads(caplog):
    from rafs.daemon.config import DaemonConfig

    with caplog.at_level(logging.WARNING):
        cfg = DaemonConfig.load(V2_SAMPLE)
    assert cfg.backend_type == "localfs" and cfg.backend_config["dir"] == "/tmp"
    assert cfg.cache_type == "filecache" and cfg.cache_work_dir == "." and cfg.cache_compressed
    assert cfg.device_id == "my_id" and cfg.mode == "direct" and cfg.digest_validate and cfg.enable_xattr
    assert cfg.amplify_io == 1000000
    pf = cfg.fs_prefetch
    assert (pf.enable, pf.threads_count, pf.merging_size, pf.bandwidth_rate, pf.prefetch_all) == \
        (True, 8, 1000000, 10000000, True)
    assert "cache.enable_encryption is accepted but not supported" in caplog.text
    # the same as JSON
    import tomllib

    obj = tomllib.load(open(V2_SAMPLE, "rb"))
    assert DaemonConfig.parse(json.dumps(obj)) == cfg


def test_v2_config_errors_name_the_key():
    import pytest

    from rafs.daemon.config import DaemonConfig
    from rafs.errors import ConfigError

    with pytest.raises(ConfigError, match="cache.type: 'fscache'"):
        DaemonConfig.parse({"version": 2, "cache": {"type": "fscache"}})
    with pytest.raises(ConfigError, match="version: only 2"):
        DaemonConfig.parse({"version": 3})
    with pytest.raises(ConfigError, match="rafs.mode"):
        DaemonConfig.parse({"version": 2, "rafs": {"mode": 5}})


def test_v2_toml_config_mounts_for_real(tmp_path):
    require_fuse()
    import tomllib

    from rafs.builder import BuildOptions, build
    from rafs.daemon.config import DaemonConfig

    src = tmp_path / "src"
    src.mkdir()
    (src / "g").write_bytes(b"v2 config" * 1000)
    (tmp_path / "blobs").mkdir()
    boot = build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(tmp_path / "blobs"),
                 options=BuildOptions()).bootstrap
    text = open(V2_SAMPLE).read()
    text = text.replace('dir = "/tmp"', f'dir = "{tmp_path}/blobs"').replace(
        'blob_file = "/tmp/nydus.blob.data"\n', "").replace('alt_dirs = ["/var/nydus/cache"]\n', "").replace(
        'work_dir = "."', f'work_dir = "{tmp_path}/cache"')
    (tmp_path / "cache").mkdir()
    cfg_path = tmp_path / "nydusd.toml"
    cfg_path.write_text(text)
    v1 = DaemonConfig.load(str(cfg_path)).raw
    assert v1 == DaemonConfig.parse(tomllib.loads(text)).raw
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        client.mount("/v2", boot, tomllib.loads(text))  # the v2 object itself through the API
        assert open(os.path.join(mnt, "v2", "g"), "rb").read() == b"v2 config" * 1000
        client.umount("/v2")
    assert os.listdir(tmp_path / "cache")  # the filecache work_dir was used


def _image(tmp_path, files: dict[str, bytes]) -> str:
    from rafs.builder import BuildOptions, build

    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    (tmp_path / "blobs").mkdir()
    return build(str(src), bootstrap_out=str(tmp_path / "image.boot"), blob_dir=str(tmp_path / "blobs"),
                 options=BuildOptions()).bootstrap


def _config(tmp_path, cache: str = "blobcache", **extra) -> dict:
    cfg = {"device": {"backend": {"type": "localfs", "config": {"dir": str(tmp_path / "blobs")}},
                      "cache": {"type": cache, "config": {"work_dir": str(tmp_path / "cache")}}}}
    cfg.update(extra)
    return cfg


def _json(sock: str, method: str, target: str, body: bytes = b"") -> tuple[int, object]:
    status, ctype, payload = _call(sock, method, target, body)
    assert "json" in ctype, (target, ctype)
    return status, (json.loads(payload) if payload else None)


def test_upstream_metrics_endpoints_answer_json(tmp_path, capfd):
    """/metrics/backend, /blobcache, /files, /pattern answer upstream's JSON with this daemon's
    numbers; Prometheus text stays behind Accept: text/plain / ?format=prometheus."""
    require_fuse()
    import time

    data = os.urandom(300 << 10)
    boot = _image(tmp_path, {"f": data, "g": b"small file"})
    config = _config(tmp_path, access_pattern=True, latest_read_files=True)
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        sock = client.apisock
        client.mount("/a", boot, config)
        t0 = int(time.time())
        assert open(os.path.join(mnt, "a", "f"), "rb").read() == data

        status, backend = _json(sock, "GET", "/api/v1/metrics/backend?id=/a")
        assert status == 200
        _check(backend, "BackendMetrics")
        assert set(backend) == set(SHAPES["BackendMetrics"])  # upstream serializes exactly these
        assert backend["backend_type"] == "localfs" and backend["read_count"] >= 1
        assert backend["read_errors"] == 0 and backend["read_amount_total"] >= len(data) // 2
        assert len(backend["read_count_block_size_dist"]) == 8
        assert sum(backend["read_count_block_size_dist"]) == backend["read_count"]
        assert [len(r) for r in backend["read_latency_sizes_dist"]] == [8] * 8
        assert sum(map(sum, backend["read_latency_sizes_dist"])) == backend["read_count"]
        assert _json(sock, "GET", "/api/v1/metrics/backend")[1]["read_count"] == backend["read_count"]  # the only one

        status, cache = _json(sock, "GET", "/api/v1/metrics/blobcache?id=/a")
        assert status == 200
        _check(cache, "BlobcacheMetrics")
        assert set(cache) == set(SHAPES["BlobcacheMetrics"])
        assert cache["store_path"] == str(tmp_path / "cache") and cache["underlying_files"]
        assert all(p.startswith(cache["store_path"] + "/") and os.path.isfile(p) for p in cache["underlying_files"])
        assert cache["entries_count"] >= 1 and cache["total"] >= cache["entries_count"]
        assert cache["partial_hits"] == 0 and cache["prefetch_requests_count"] == 0

        for target, accept in (("/api/v1/metrics/backend?id=/a", "text/plain"),
                               ("/api/v1/metrics/blobcache?id=/a&format=prometheus", "")):
            status, ctype, body = _call(sock, "GET", target, accept=accept)
            assert status == 200 and ctype.startswith("text/plain") and b"nydus_storage_" in body
        assert "nydus_storage_backend_read_requests_total" in client.request(
            "GET", "/api/v1/metrics/backend", raw=True)

        status, pattern = _json(sock, "GET", "/api/v1/metrics/pattern?id=/a")
        assert status == 200 and len(pattern) == 1  # only f was read
        _check(pattern[0], "AccessPattern")
        assert pattern[0]["nr_read"] >= 1 and abs(pattern[0]["first_access_time_secs"] - t0) <= 5
        status, latest = _json(sock, "GET", "/api/v1/metrics/files?id=/a&latest=true")
        assert status == 200 and latest == [pattern[0]["ino"]]
        assert _json(sock, "GET", "/api/v1/metrics/files?id=/a&latest=true")[1] == []  # cleared
        assert _json(sock, "GET", "/api/v1/metrics/files?id=/a") == (200, {})  # iostats_files off: upstream's {}
        assert _json(sock, "GET", "/api/v1/metrics?id=/a")[1]["access_pattern_enabled"] is True

        # a second instance with per-file counters, without the other recording and a blob cache
        client.mount("/b", boot, _config(tmp_path, cache="dummycache", iostats_files=True))
        assert open(os.path.join(mnt, "b", "g"), "rb").read() == b"small file"
        with open(os.path.join(mnt, "b", "f"), "rb", buffering=0) as f:
            assert f.read(4096) == data[:4096]
        assert not [line for line in capfd.readouterr().err.splitlines() if "iostats_files" in line]
        status, stats = _json(sock, "GET", "/api/v1/metrics/files?id=/b")
        assert status == 200 and len(stats) == 2, stats  # upstream's InodeIoStats per inode read
        for counters in stats.values():
            _check(counters, "InodeIoStats")
            assert len(counters["block_count_read"]) == 8 and len(counters["fop_hits"]) == 15
            assert counters["total_fops"] == counters["fop_hits"][4] >= 1 and counters["fop_errors"][4] == 0
        by_size = sorted(stats.values(), key=lambda c: c["data_read"])
        assert by_size[0]["data_read"] == len(b"small file") and by_size[0]["block_count_read"][0] >= 1
        assert by_size[1]["data_read"] >= 4096
        assert _json(sock, "GET", "/api/v1/metrics?id=/b")[1]["files_account_enabled"] is True
        assert _json(sock, "GET", "/api/v1/metrics?id=/a")[1]["files_account_enabled"] is False
        assert _json(sock, "GET", "/api/v1/metrics/pattern?id=/b") == (200, [])  # upstream: off = []
        assert _json(sock, "GET", "/api/v1/metrics/files?id=/b&latest=true") == (200, [])
        assert _json(sock, "GET", "/api/v1/metrics?id=/b")[1]["access_pattern_enabled"] is False
        status, err = _json(sock, "GET", "/api/v1/metrics/blobcache?id=/b")
        assert status == 404 and "no blob cache" in err["message"]
        _check(_json(sock, "GET", "/api/v1/metrics/backend?id=/b")[1], "BackendMetrics")
        for target in ("/api/v1/metrics/backend", "/api/v1/metrics/blobcache", "/api/v1/metrics/pattern",
                       "/api/v1/metrics/files", "/api/v1/metrics/files?id=/nope"):
            status, err = _json(sock, "GET", target)  # two instances and no id: upstream's NoCounter 404
            assert status == 404, target
            _check(err, "ErrorMessage")
        # upstream nydusctl's spelling: metrics backend | cache | fsstats (JSON printed)
        from snapshotter import ctl

        capfd.readouterr()
        for category, field in (("backend", "read_latency_sizes_dist"), ("cache", "underlying_files"),
                                ("fsstats", "fop_hits")):
            assert ctl.main(["-S", sock, "metrics", category, "--id", "/a"]) == 0
            assert field in json.loads(capfd.readouterr().out)
        assert ctl.main(["-S", sock, "metrics", "--kind", "pattern", "--id", "/a"]) == 0
        assert json.loads(capfd.readouterr().out) == pattern
        assert ctl.main(["-S", sock, "metrics", "--kind", "inflight"]) == 0
        assert isinstance(json.loads(capfd.readouterr().out), list)
        client.umount("/b")
        client.umount("/a")


def test_v2_blobs_answer_as_unsupported(tmp_path):
    """/api/v2/blobs (fscache blob objects) answers as upstream nydusd answers it in fusedev
    mode: 501 with one message (400 when a parameter is missing; deleting a blob file by id is
    upstream fusedev's no-op 204)."""
    require_fuse()
    boot = _image(tmp_path, {"f": b"x" * 100})
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        sock = client.apisock
        client.mount("/a", boot, _config(tmp_path))
        for method, target, want in (("GET", "/api/v2/blobs?domain_id=d", 501),
                                     ("PUT", "/api/v2/blobs", 501), ("POST", "/api/v2/blobs", 501),
                                     ("DELETE", "/api/v2/blobs?domain_id=d&blob_id=b", 501),
                                     ("GET", "/api/v2/blobs", 400), ("DELETE", "/api/v2/blobs", 400)):
            status, err = _json(sock, method, target, b'{"type": "bootstrap", "id": "x"}' if method in (
                "PUT", "POST") else b"")
            assert status == want, (method, target, status, err)
            _check(err, "ErrorMessage")
            if want == 501:
                assert "(DaemonAbnormal(Unsupported))" in err["message"] and "fscache" in err["message"]
                assert err["code"] == "Unsupported" and len(err["message"].splitlines()) == 1
        status, ctype, payload = _call(sock, "DELETE", "/api/v2/blobs?blob_id=b")
        assert status == 204 and payload == b""
        client.umount("/a")


def _cache_fds(pid: int, cache_dir: str) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(cache_dir + "/"):
            out.add(target)
    return out


def test_put_mount_remounts_in_place(tmp_path, monkeypatch):
    """PUT /api/v1/mount (upstream's remount): the instance is served from the new bootstrap and
    config (here: another blob directory) in place, without an unmount; the old image is closed
    after the grace period."""
    require_fuse()
    import time

    from rafs.builder import BuildOptions, build
    from rafs.daemon import service

    monkeypatch.setattr(service, "REMOUNT_GRACE", 0.2)  # the forked daemon inherits it

    boots, configs = {}, {}
    for gen, files in (("one", {"f": b"same", "g": b"old g"}), ("two", {"f": b"same", "g": b"new g!", "h": b"h"})):
        src, blobs = tmp_path / gen / "src", tmp_path / gen / "blobs"
        src.mkdir(parents=True)
        blobs.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
        boots[gen] = build(str(src), bootstrap_out=str(tmp_path / gen / "image.boot"), blob_dir=str(blobs),
                           options=BuildOptions()).bootstrap
        configs[gen] = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                   "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
                        "access_pattern": gen == "two"}
    with running_daemon(tmp_path, opener="real") as (client, mnt, proc):
        sock = client.apisock
        client.mount("/a", boots["one"], configs["one"])
        assert open(os.path.join(mnt, "a", "f"), "rb").read() == b"same"
        old_files = _cache_fds(proc.pid, str(tmp_path / "cache"))
        assert old_files  # image one's cache files are open
        body = json.dumps({"fs_type": "rafs", "source": boots["two"], "config": json.dumps(configs["two"])}).encode()
        status, _ = _json(sock, "PUT", "/api/v1/mount?mountpoint=/a", body)
        assert status == 204
        assert client.info()["instances"]["/a"]["bootstrap"] == boots["two"]
        assert open(os.path.join(mnt, "a", "g"), "rb").read() == b"new g!"  # never looked up before
        assert open(os.path.join(mnt, "a", "h"), "rb").read() == b"h"
        deadline = time.monotonic() + 10
        while old_files & _cache_fds(proc.pid, str(tmp_path / "cache")):  # the old image is closed
            assert time.monotonic() < deadline, _cache_fds(proc.pid, str(tmp_path / "cache"))
            time.sleep(0.05)
        assert _cache_fds(proc.pid, str(tmp_path / "cache"))  # image two's are open
        assert len(_json(sock, "GET", "/api/v1/metrics/pattern?id=/a")[1]) == 2  # the new config's
        client.remount("/a", boots["two"], configs["two"])  # the client's call, again
        assert len(_json(sock, "GET", "/api/v1/metrics/pattern?id=/a")[1]) == 0  # a fresh instance
        status, err = _json(sock, "PUT", "/api/v1/mount?mountpoint=/nope", body)
        assert status == 404
        bad = json.dumps({"source": str(tmp_path / "missing"), "config": "{}"}).encode()
        status, err = _json(sock, "PUT", "/api/v1/mount?mountpoint=/a", bad)
        assert status == 400 and "source" in err["message"]
        assert open(os.path.join(mnt, "a", "h"), "rb").read() == b"h"  # still the new image
        client.umount("/a")


class _GatedOpener:
    """The real opener whose device reads wait while the file ``gate`` exists (fork: not pickled)."""

    def __init__(self, gate: str) -> None:
        from rafs.daemon.service import StorageOpener

        self.real = StorageOpener()
        self.gate = gate

    def open_tree(self, bootstrap):
        return self.real.open_tree(bootstrap)

    def open_device(self, blobs, config):
        import time

        device = self.real.open_device(blobs, config)
        read = device.read

        def gated(iovec, *args):
            while os.path.exists(self.gate):
                time.sleep(0.02)
            return read(iovec, *args)

        device.read = gated
        device.read_ready = lambda iovec: None
        device.read_complete = lambda iovec, open_new=True: None
        return device


def _wait_idle(sock: str) -> None:
    """Until the inflight answer is upstream's idle one, 204 without a body (a request of
    another process, e.g. a getattr of the mount root, may be in flight for a moment)."""
    import time

    deadline = time.monotonic() + 10
    while True:
        status, _, payload = _call(sock, "GET", "/api/v1/metrics/inflight")
        if status == 204:
            assert payload == b""
            return
        assert status == 200 and time.monotonic() < deadline, payload
        time.sleep(0.05)


def _hung_io_counts(sock: str, interval: str) -> float:
    """``nydusd_hung_io_counts`` as the snapshotter's upstream collector reports it for one daemon."""
    import types

    from snapshotter import config as C
    from snapshotter.metrics import _UpstreamCollector

    cfg = C.from_dict({"version": 1, "root": "/nonexistent", "metrics": {"hung_io_interval": interval}})
    rec = types.SimpleNamespace(apisock=sock, pid=0, daemon_id="d", shared=True, instances={})
    mgr = types.SimpleNamespace(daemons=lambda: [rec], events={})
    sn = types.SimpleNamespace(config=cfg, rafs=types.SimpleNamespace(manager_if_started=mgr),
                               instance_refs=dict, cache_size=lambda: 0, blobs_in_use=set)
    fams = {f.name: f for f in _UpstreamCollector(sn).collect()}
    return fams["nydusd_hung_io_counts"].samples[0].value


def test_inflight_lists_a_hanging_read(tmp_path):
    """/api/v1/metrics/inflight: 204 when idle; a read held in the daemon is listed with
    upstream's fields (opcode 15 = FUSE_READ) until it is answered."""
    require_fuse()
    import threading
    import time

    boot = _image(tmp_path, {"f": b"held" * 1000})
    gate = tmp_path / "gate"
    with running_daemon(tmp_path, opener=_GatedOpener(str(gate)), fuse_impl="ll") as (client, mnt, _):
        sock = client.apisock
        client.mount("/a", boot, _config(tmp_path))
        path = os.path.join(mnt, "a", "f")
        os.stat(path)
        _wait_idle(sock)
        gate.write_text("")
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(open(path, "rb").read()))
        t0 = int(time.time())
        reader.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                status, _, payload = _call(sock, "GET", "/api/v1/metrics/inflight")
                ops = json.loads(payload) if status == 200 else []
                if any(op["opcode"] == 15 for op in ops):
                    break
                assert time.monotonic() < deadline, "the held read never showed up"
                time.sleep(0.05)
            for op in ops:
                _check(op, "FuseOp")
            read = [op for op in ops if op["opcode"] == 15][0]
            assert read["unique"] > 0 and read["inode"] > 1 and abs(read["timestamp_secs"] - t0) <= 5
            # the snapshotter's upstream series count it as hung past [metrics] hung_io_interval
            assert _hung_io_counts(sock, "0s") >= 1 and _hung_io_counts(sock, "1h") == 0
        finally:
            gate.unlink()
            reader.join(10)
        assert got == [b"held" * 1000]
        _wait_idle(sock)
        client.umount("/a")


def test_backend_failures_become_upstream_events_and_size_classes():
    """A backend read that fails for good is an event of ``/api/v1/daemon/events`` (upstream's
    ``ErrorHolder``: bounded ring of "<date> - <error>"); every read lands in upstream's size
    and latency classes, failed ones too."""
    import pytest

    from storage.backend.base import BlobReader
    from storage.errors import BackendError
    from storage.metrics import EVENTS, ErrorHolder, latency_class, size_class

    class Broken(BlobReader):
        def _read_once(self, offset, size):
            raise BackendError("blob is gone")

        def _blob_size(self):
            return 1 << 20

    reader = Broken("b" * 64, retry_limit=0)
    before = EVENTS.export()["total_errors"]
    with pytest.raises(BackendError):
        reader.read(0, 4096)
    events = EVENTS.export()
    assert events["total_errors"] == min(before + 1, events["max_errors"])
    assert events["errors"][-1].endswith("read 0+4096: BackendError: blob is gone")
    assert " GMT - blob " in events["errors"][-1]
    dist = reader.metrics.backend_dist.snapshot()
    assert dist["read_count_block_size_dist"] == [0, 0, 1, 0, 0, 0, 0, 0]  # 4 KiB: upstream's class 2

    holder = ErrorHolder(max_errors=3, max_size=200)
    for i in range(5):
        holder.push(f"e{i}")
    out = holder.export()
    assert out["total_errors"] == 3 and [e.rsplit(" - ", 1)[1] for e in out["errors"]] == ["e2", "e3", "e4"]
    assert out["total_size"] == sum(map(len, out["errors"])) and out["max_size"] == 200
    # upstream's request_size_index and latency_millis_range_index boundaries
    assert [size_class(n) for n in (0, 1023, 1024, 4096, 16384, 65536, 131072, 524288, 1 << 20, 1 << 30)] == \
        [0, 0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert [latency_class(ms) for ms in (0, 1, 2, 20, 21, 50, 100, 500, 1000, 2000, 2001)] == \
        [0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7]


def test_inflight_with_libfuse_loop_is_not_served(tmp_path):
    """libfuse's loop (``--fuse-impl pyfuse3``) does not say which requests it is serving: 501
    with one line, as upstream answers what its daemon does not support."""
    require_fuse()
    with running_daemon(tmp_path, fuse_impl="pyfuse3") as (client, mnt, _):
        status, err = _json(client.apisock, "GET", "/api/v1/metrics/inflight")
        assert status == 501 and err["code"] == "Unsupported" and "--fuse-impl ll" in err["message"]


def test_request_size_classes_match_upstream():
    """``block_count_read`` classes: the boundaries upstream's own unit test pins
    (utils/src/metrics.rs ``test_request_size_index``)."""
    from rafs.fs.instance import request_size_index

    cases = {0x0: 0, 0x3FF: 0, 0x400: 1, 0xFFF: 1, 0x1000: 2, 0x3FFF: 2, 0x4000: 3, 0xFFFF: 3,
             0x1_0000: 4, 0x1_FFFF: 4, 0x2_0000: 5, 0x7_FFFF: 5, 0x8_0000: 6, 0xF_FFFF: 6,
             0x10_0000: 7, (1 << 64) - 1: 7}
    assert {size: request_size_index(size) for size in cases} == cases


def test_read_latency_classes_match_upstream():
    """``read_latency_dist`` classes: upstream's ``latency_micros_range_index`` (<=200us, 1ms,
    20ms, 50ms, 500ms, 1s, 2s, more), and each read counted once in each distribution."""
    from rafs.fs.instance import InstanceMetrics, latency_range_index

    cases = {0: 0, 200: 0, 201: 1, 1_000: 1, 1_001: 2, 20_000: 2, 20_001: 3, 50_000: 3, 50_001: 4,
             500_000: 4, 500_001: 5, 1_000_000: 5, 1_000_001: 6, 2_000_000: 6, 2_000_001: 7, 10**9: 7}
    assert {us: latency_range_index(us) for us in cases} == cases
    m = InstanceMetrics()
    m.add_read(4096, 0.0001, True)    # 4 KiB in 100 us
    m.add_read(1 << 20, 0.03, True)   # 1 MiB in 30 ms
    m.add_read(0, 3.0, False)         # a failed read after 3 s
    assert m.block_count_read == [1, 0, 1, 0, 0, 0, 0, 1]  # 0 bytes, 4 KiB, 1 MiB
    assert m.read_latency_dist == [1, 0, 0, 1, 0, 0, 0, 1]
    assert (m.read_count, m.read_errors, m.read_bytes) == (3, 1, 4096 + (1 << 20))


def test_put_mount_of_an_erofs_instance_is_refused_precisely(tmp_path):
    """Remount under the erofs driver: the kernel's EROFS mount cannot change its image in
    place (upstream's erofs/fscache mode has no remount either): 501 with what to do instead;
    the instance keeps serving."""
    require_fuse()
    from tests.test_fs_erofs import require_erofs

    require_erofs()
    boot = _image(tmp_path, {"f": b"erofs remount" * 400})
    config = _config(tmp_path)
    with running_daemon(tmp_path, opener="real", fs_driver="erofs") as (client, mnt, _):
        client.mount("/e", boot, config)
        assert client.info()["instances"]["/e"]["fs_driver"] == "erofs"
        body = json.dumps({"fs_type": "rafs", "source": boot, "config": json.dumps(config)}).encode()
        status, err = _json(client.apisock, "PUT", "/api/v1/mount?mountpoint=/e", body)
        assert status == 501 and err["code"] == "Unsupported", err
        assert "Remount(MountFilesystem(Unsupported))" in err["message"] and "DELETE" in err["message"]
        assert open(os.path.join(mnt, "e", "f"), "rb").read() == b"erofs remount" * 400
        client.umount("/e")
