"""Every endpoint of upstream nydusd's OpenAPI documents (tests/data/upstream/nydus-api-v*.yaml)
is routed by this daemon, and its JSON answers carry the properties the documents' schemas name
(less the few the documents list but upstream nydusd's own serializer no longer sends)."""

from __future__ import annotations

import json
import os

import yaml

from tests.fs_harness import require_fuse, running_daemon
from tests.test_upstream_api import _call, _config, _image

DATA = os.path.join(os.path.dirname(__file__), "data", "upstream")
V1 = yaml.safe_load(open(os.path.join(DATA, "nydus-api-v1.yaml")))
V2 = yaml.safe_load(open(os.path.join(DATA, "nydus-api-v2.yaml")))
TYPES = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict}
#: schema properties upstream nydusd (utils/src/metrics.rs, service/src/daemon.rs at the pinned
#: commit) does not serialize although the document names them: ``id`` is ``skip_serializing``,
#: ``read_latency_dist`` / ``prefetch_mr_count`` were renamed or dropped
NOT_SENT_UPSTREAM = {"RafsBackend": {"id", "read_latency_dist"}, "Blobcache": {"id", "prefetch_mr_count"}}
#: document types upstream nydusd's serializer contradicts (it sends a number / a list)
TYPE_UPSTREAM = {("RafsBackend", "read_count"): int, ("Blobcache", "underlying_files"): list}
#: routes upstream nydusd serves (``HTTP_ROUTES`` in api/src/http_handler.rs at the pinned commit)
#: that its OpenAPI documents leave out; upstream nydus-snapshotter drives hot upgrade and
#: failover with the first three (pkg/daemon/client.go). ``/config`` is not served here.
UNDOCUMENTED_V1 = {("/daemon/start", "PUT"), ("/daemon/fuse/sendfd", "PUT"), ("/daemon/fuse/takeover", "PUT")}
#: Option<String> fields upstream serializes as null when unset
NULLABLE = {("DaemonInfo", "supervisor"), ("DaemonInfo", "backend_collection")}


def _check_schema(doc: dict, name: str, obj: object) -> None:
    schema = doc["components"]["schemas"][name]
    if schema.get("type") == "array":
        assert isinstance(obj, list), (name, obj)
        for item in obj:
            _check_props(name, schema["items"], item)
        return
    _check_props(name, schema, obj)


def _check_props(name: str, schema: dict, obj: object) -> None:
    assert isinstance(obj, dict), (name, obj)
    for prop, spec in schema.get("properties", {}).items():
        if prop in NOT_SENT_UPSTREAM.get(name, ()):
            continue
        assert prop in obj, (name, prop, sorted(obj))
        if obj[prop] is None and (name, prop) in NULLABLE:
            continue
        want = TYPE_UPSTREAM.get((name, prop)) or TYPES[spec.get("type", "object")]
        value = obj[prop]
        assert isinstance(value, want) and not (want is int and isinstance(value, bool)), (name, prop, value)
        if "enum" in spec:
            assert value in spec["enum"], (name, prop, value)


def _routes(doc: dict) -> set[tuple[str, str]]:
    return {(path, m.upper()) for path, ops in doc["paths"].items() for m in ops
            if m in ("get", "put", "post", "delete")}


def test_openapi_documents_are_the_pinned_copies():
    assert V1["servers"][0]["url"].endswith("/api/v1") and V1["info"]["title"] == "Nydus-rs API"
    assert ("/metrics/inflight", "GET") in _routes(V1) and ("/blobs", "PUT") in _routes(V2)


def test_every_openapi_endpoint_is_served_with_its_schema(tmp_path):
    require_fuse()
    boot = _image(tmp_path, {"f": b"openapi" * 500})
    config = _config(tmp_path, access_pattern=True, latest_read_files=True)
    mount_body = json.dumps({"fs_type": "rafs", "source": boot, "config": json.dumps(config)}).encode()
    # (version, path, method) -> (target, body, expected status, schema of a JSON answer or None)
    requests = {
        ("v1", "/daemon", "GET"): ("/api/v1/daemon", b"", 200, "DaemonInfo"),
        ("v1", "/daemon", "PUT"): ("/api/v1/daemon", b'{"log_level": "info"}', 204, None),
        ("v1", "/daemon/events", "GET"): ("/api/v1/daemon/events", b"", 200, "Events"),
        ("v1", "/daemon/backend", "GET"): ("/api/v1/daemon/backend?mountpoint=/a", b"", 200, "DaemonFsBackend"),
        ("v1", "/mount", "PUT"): ("/api/v1/mount?mountpoint=/a", mount_body, 204, None),
        ("v1", "/metrics", "GET"): ("/api/v1/metrics?id=/a", b"", 200, "RafsMetrics"),
        ("v1", "/metrics/files", "GET"): ("/api/v1/metrics/files?id=/a&latest=true", b"", 200, None),
        ("v1", "/metrics/pattern", "GET"): ("/api/v1/metrics/pattern?id=/a", b"", 200, None),
        ("v1", "/metrics/backend", "GET"): ("/api/v1/metrics/backend?id=/a", b"", 200, "RafsBackend"),
        ("v1", "/metrics/blobcache", "GET"): ("/api/v1/metrics/blobcache?id=/a", b"", 200, "Blobcache"),
        ("v1", "/metrics/inflight", "GET"): ("/api/v1/metrics/inflight", b"", (200, 204), "FuseInflight"),
        ("v1", "/mount", "DELETE"): ("/api/v1/mount?mountpoint=/a", b"", 204, None),
        ("v1", "/mount", "POST"): ("/api/v1/mount?mountpoint=/a", mount_body, 204, None),
        ("v2", "/daemon", "GET"): ("/api/v2/daemon", b"", 200, "DaemonInfo"),
        ("v2", "/daemon", "PUT"): ("/api/v2/daemon", b'{"log_level": "info"}', 204, None),
        ("v2", "/blobs", "GET"): ("/api/v2/blobs?domain_id=d", b"", 501, "ErrorMsg"),
        ("v2", "/blobs", "PUT"): ("/api/v2/blobs", b'{"type": "bootstrap", "id": "b"}', 501, "ErrorMsg"),
        ("v2", "/blobs", "DELETE"): ("/api/v2/blobs?domain_id=d", b"", 501, "ErrorMsg"),
    }
    # a daemon that is RUNNING and was not started --upgrade: the successor's steps are refused
    # with upstream's 400 UnexpectedEvent; sendfd needs a --supervisor (tests/test_upstream_upgrade.py
    # runs them all in upstream's order, and exit, on real processes)
    requests.update({
        ("v1", "/daemon/fuse/takeover", "PUT"): ("/api/v1/daemon/fuse/takeover", b"", 400, "ErrorMsg"),
        ("v1", "/daemon/start", "PUT"): ("/api/v1/daemon/start", b"", 400, "ErrorMsg"),
        ("v1", "/daemon/fuse/sendfd", "PUT"): ("/api/v1/daemon/fuse/sendfd", b"", 400, "ErrorMsg"),
    })
    skipped = {("v1", "/daemon/exit", "PUT")}  # ends the daemon: test_upstream_upgrade covers it
    documented = {("v1", *r) for r in _routes(V1)} | {("v2", *r) for r in _routes(V2)}
    assert documented | {("v1", *r) for r in UNDOCUMENTED_V1} == set(requests) | skipped  # new endpoints fail here
    with running_daemon(tmp_path, opener="real") as (client, mnt, _):
        sock = client.apisock
        client.mount("/a", boot, config)
        assert open(os.path.join(mnt, "a", "f"), "rb").read() == b"openapi" * 500
        for key, (target, body, want, schema) in requests.items():
            status, ctype, payload = _call(sock, key[2], target, body)
            assert status in (want if isinstance(want, tuple) else (want,)), (key, status, payload)
            if schema and payload:
                assert "json" in ctype, key
                _check_schema(V1 if key[0] == "v1" else V2, schema, json.loads(payload))
        # the answers documented as lists / a oneOf
        status, _, payload = _call(sock, "GET", "/api/v1/metrics/files?id=/a&latest=true")
        assert status == 200 and isinstance(json.loads(payload), list)  # RafsLatestReadFiles
        open(os.path.join(mnt, "a", "f"), "rb").read()
        status, _, payload = _call(sock, "GET", "/api/v1/metrics/pattern?id=/a")
        assert status == 200 and json.loads(payload)
        for item in json.loads(payload):
            _check_props("RafsFilesAccessPatterns", V1["components"]["schemas"]["RafsFilesAccessPatterns"], item)
        client.umount("/a")
