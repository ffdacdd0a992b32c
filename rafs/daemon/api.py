"""nydusd's HTTP+JSON control API on a unix socket (mode 0600); its client is
:mod:`rafs.daemon.client`.

Endpoints (upstream paths; docs/mounts.md has the answers in full):

* ``GET /api/v1/daemon`` — upstream's ``DaemonInfo`` (id, version, state, supervisor,
  backend_collection) plus ours (instances, ...); ``GET /api/v2/daemon`` the same without the
  filesystems' info (``backend_collection`` null)
* ``PUT /api/v1/daemon`` (and ``/api/v2/daemon``) body ``{"log_level": "debug"}`` — log level
* ``GET /api/v1/daemon/backend?mountpoint=/<id>`` — upstream's answer: the instance's RAFS
  super block metadata (``RafsSuperMeta``)
* ``GET /api/v1/daemon/events`` — upstream's ``ErrorHolder``: failed backend reads
* ``PUT /api/v1/config[?id=/<id>]`` body ``{"registry_auth": <base64 user:password>, "proxy_url": ...}``
  — upstream's runtime config of the instances' backends (credential rotation without a
  remount); ``GET`` the same path: the keys set, ``registry_auth`` as a ``sha256:`` fingerprint
* ``POST /api/v1/mount?mountpoint=/<id>`` body ``{"fs_type":"rafs","source":<bootstrap>,"config":<json>}``
* ``PUT /api/v1/mount?mountpoint=/<id>`` same body — upstream's remount: the instance is served
  from the new bootstrap and config in place (fusedev instances; erofs ones: 501)
* ``DELETE /api/v1/mount?mountpoint=/<id>``
* ``POST /api/v1/prefetch?mountpoint=/<id>`` body ``{"files": [...]}`` (optional) — start prefetch
* ``GET /api/v1/trace?mountpoint=/<id>`` — the prefetch trace recorded so far (text, see
  :mod:`rafs.trace`; only with ``fs_prefetch.record_trace``; ours, not upstream's)
* ``GET /api/v1/metrics[?id=/<id>]`` — upstream's ``FsMetric`` JSON for one instance (without
  ``id``: summed over all, ``id`` "")
* ``GET /api/v1/metrics/backend[?id=]``, ``/metrics/blobcache[?id=]`` — upstream's
  ``BackendMetrics`` / ``BlobcacheMetrics`` JSON of one instance (without ``id``: the only one,
  else 404 as upstream's ``NoCounter``)
* on ``/metrics``, ``/metrics/backend``, ``/metrics/blobcache``: ``Accept: text/plain`` (or
  ``?format=prometheus``) answers Prometheus text instead (every family / only the storage
  backend / only the cache + prefetch families)
* ``GET /api/v1/metrics/pattern[?id=]`` — upstream's access patterns (``access_pattern``; ``[]`` off)
* ``GET /api/v1/metrics/files[?id=][&latest=true]`` — the files read since the last call
  (``latest_read_files``; ``[]`` off); without ``latest``: upstream's per-file counters
  (``iostats_files``; ``{}`` off)
* ``GET /api/v1/metrics/inflight`` — FUSE requests being served (204 when none)
* ``/api/v2/blobs`` — upstream's fscache blob objects: answered as upstream nydusd answers them in
  fusedev mode (501 ``...(DaemonAbnormal(Unsupported))``, 400 without parameters, 204 for
  ``DELETE ?blob_id=``)
* ``PUT /api/v1/daemon/exit`` — exit; with a ``--supervisor`` holding the session (upstream's
  exit) leaving the FUSE connection (and the erofs mounts) to a successor, else unmounting
  everything first; ``?handover=1`` / ``?handover=0`` force either
* ``PUT /api/v1/daemon/fuse/sendfd`` — send the FUSE fds and handover state to ``--supervisor``
* ``PUT /api/v1/daemon/fuse/takeover`` — upstream's Takeover (INIT -> READY) of an ``--upgrade``
  daemon: adopt the session the supervisor holds, not serving yet
* ``PUT /api/v1/daemon/start`` — upstream's Start (READY -> RUNNING): serve it

Errors answer ``{"code": <name>, "message": <text>}`` with 400/404/409/422/500/501 (400
``UnexpectedEvent``: a lifecycle request the daemon's state does not allow, as upstream). Every malformed
request is a 4xx with the reason: bad HTTP, a body that is not a JSON object (or nested too
deeply), a ``source`` that is not a readable RAFS bootstrap, an instance name breaking
:func:`rafs.daemon.config.check_instance_name`; 500 is left for the daemon's own failures and
501 for what upstream answers as unsupported by this kind of daemon.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.parse
from typing import Any

import trio

from rafs.daemon.client import ApiError
from rafs.daemon.config import DaemonConfig, loads_json
from rafs.errors import ConfigError, MountError, NotFound, NotServed, RafsError, StateError, UnsupportedError
from rafs.fs.instance import BLOCK_READ_SIZES, READ_LATENCY_RANGES
from storage.errors import StorageError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
_EXIT = object()
_REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 422: "Unprocessable Entity",
            500: "Internal Server Error", 501: "Not Implemented"}


def _error_status(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, NotServed):
        return 501, "Unsupported"
    if isinstance(exc, StateError):
        return 400, "UnexpectedEvent"
    if isinstance(exc, NotFound):
        return 404, "NotFound"
    if isinstance(exc, UnsupportedError):
        return 422, "Unsupported"
    if isinstance(exc, ConfigError):
        return 400, "InvalidConfig"
    if isinstance(exc, MountError):
        return 409, "MountError"
    if isinstance(exc, (RafsError, StorageError)):
        return 500, type(exc).__name__
    return 500, "InternalError"


async def serve(daemon: Any, path: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the unix socket ``path`` (0600) and answer requests until cancelled."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    task_status.started()
    await trio.serve_listeners(lambda stream: _handle(daemon, stream), [listener])


async def _read_request(stream: trio.abc.Stream) -> tuple[str, str, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ValueError("connection closed before the request headers ended")
        buf += chunk
        if len(buf) > MAX_BODY:
            raise ValueError("request headers too large")
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        raise ValueError(f"request body too large ({length} bytes)")
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ValueError("connection closed in the request body")
        body += chunk
    return method, target, headers, body[:length]


async def _handle(daemon: Any, stream: trio.abc.Stream) -> None:
    try:
        with trio.fail_after(60):
            try:
                method, target, headers, body = await _read_request(stream)
            except (ValueError, UnicodeDecodeError) as exc:
                await _send(stream, 400, {"code": "BadRequest", "message": str(exc)})
                return
            try:
                status, payload = await _dispatch(daemon, method, target, body, headers)
            except Exception as exc:  # every error becomes a JSON answer, the daemon keeps going
                status, code = _error_status(exc)
                if status == 500:
                    log.error("API %s %s: %s: %s", method, target, type(exc).__name__, exc)
                payload = {"code": code, "message": str(exc)}
            if payload is _EXIT:
                await _send(stream, status, None)
                daemon.shutdown()  # after the answer went out
                return
            await _send(stream, status, payload)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    finally:
        await stream.aclose()


async def _send(stream: trio.abc.Stream, status: int, payload: Any) -> None:
    if payload is None:
        body, ctype = b"", "application/json"
    elif isinstance(payload, str):
        body, ctype = payload.encode("utf-8", "surrogateescape"), "text/plain; version=0.0.4"
    else:
        body, ctype = json.dumps(payload).encode(), "application/json"
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    await stream.send_all(head.encode() + body)


def _json_body(body: bytes) -> dict:
    if not body:
        return {}
    obj = loads_json(body, "request body")
    if not isinstance(obj, dict):
        raise ConfigError("request body must be a JSON object")
    return obj


# upstream's FUSE operation order (StatsFop) for the fop_hits / fop_errors arrays
FOPS = ("getattr", "readlink", "open", "release", "read", "statfs", "getxattr", "listxattr",
        "opendir", "lookup", "readdir", "readdirplus", "access", "forget", "batchforget")
_LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
               "warn": logging.WARNING, "error": logging.ERROR}


def upstream_info(daemon: Any) -> dict:
    """``GET /api/v1/daemon``: upstream's ``DaemonInfo`` fields plus ours (instances, ...)."""
    info = dict(daemon.info())
    version = {"package_ver": "", "git_commit": "", "build_time": "", "profile": "", "rustc": ""}
    version.update(info.get("version") or {})
    info["version"] = version
    info.setdefault("supervisor", getattr(daemon, "supervisor", None))
    info.setdefault("backend_collection", {})
    return info


#: upstream's default attr/entry timeout (seconds), serialized as a Rust Duration
_RAFS_DEFAULT_TIMEOUT = {"secs": 1 << 32, "nanos": 0}


def backend_info(daemon: Any, mountpoint: str | None) -> dict:
    """``GET /api/v1/daemon/backend?mountpoint=/<id>``: upstream's answer, the instance's RAFS
    super block metadata (``RafsSuperMeta``: version 0x500/0x600, table offsets, ``flags`` as
    ``{"bits": N}``, timeouts as ``{"secs", "nanos"}``); 400 without ``mountpoint``."""
    if not mountpoint:
        raise ConfigError("'mountpoint' should be specified in query string")
    inst = daemon._instance(mountpoint)
    tree = getattr(inst.tree, "rafs", inst.tree)  # erofs blob files: the RAFS image they present
    info = tree.info()
    v6 = info.get("version") == 6
    sb = getattr(tree, "sb", None)
    out = {"magic": int(getattr(sb, "s_magic", 0)), "version": 0x600 if v6 else 0x500,
           "sb_size": 0 if v6 else int(getattr(sb, "s_sb_size", 0)), "root_inode": int(info.get("root_ino") or 0),
           "chunk_size": int(info.get("chunk_size") or 0), "batch_size": 0,
           "inodes_count": int(info.get("inode_count") or 0), "flags": {"bits": int(info.get("flags") or 0)},
           "inode_table_entries": 0, "inode_table_offset": 0, "blob_table_size": 0, "blob_table_offset": 0,
           "extended_blob_table_offset": 0, "extended_blob_table_entries": 0, "blob_device_table_count": 0,
           "blob_device_table_offset": 0, "prefetch_table_offset": 0, "prefetch_table_entries": 0,
           "attr_timeout": dict(_RAFS_DEFAULT_TIMEOUT), "entry_timeout": dict(_RAFS_DEFAULT_TIMEOUT),
           "is_chunk_dict": False, "meta_blkaddr": 0, "root_nid": 0, "chunk_table_offset": 0,
           "chunk_table_size": 0}
    out["blob_table_offset"], out["blob_table_size"] = (int(x) for x in info["blob_table"])
    if v6:
        out["meta_blkaddr"] = int(info.get("meta_blkaddr") or 0)
        out["root_nid"] = int(getattr(sb, "s_root_nid", 0))
        out["blob_device_table_count"] = int(getattr(sb, "s_extra_devices", 0))
        out["blob_device_table_offset"] = int(getattr(sb, "s_devt_slotoff", 0)) * 128
        out["chunk_table_offset"], out["chunk_table_size"] = (int(x) for x in info["chunk_table"])
        offset, size = info["prefetch_table"]
        out["prefetch_table_offset"], out["prefetch_table_entries"] = int(offset), int(size) // 4
    else:
        out["inode_table_offset"], out["inode_table_entries"] = (int(x) for x in info["inode_table"])
        out["extended_blob_table_offset"], out["extended_blob_table_entries"] = (
            int(x) for x in info["extended_blob_table"])
        out["prefetch_table_offset"], out["prefetch_table_entries"] = (int(x) for x in info["prefetch_table"])
    return out


def fs_metric(daemon: Any, only: str | None) -> dict:
    """Upstream's ``FsMetric``: of the instance at ``only``, else the sum over every instance
    (upstream's global metrics, ``id`` "").

    Counted: ``data_read``, the ``read`` slots, ``block_count_read`` (request size classes) and
    ``read_latency_dist`` (latency classes, ``measure_latency`` true as upstream's default) per
    instance; other operations' hits daemon wide, from the FUSE loop. Not tracked, reported as
    zeros: ``nr_opens``, ``nr_max_opens``, ``last_fop_tp``.
    """
    insts = daemon.fs.instances() if getattr(daemon, "fs", None) else {}
    named = {("/" + k if k not in ("", "root") else "/"): v for k, v in insts.items()}
    if only:
        if only not in named:
            raise NotFound(f"no instance mounted at {only}")
        chosen = [named[only]]
    else:
        chosen = list(named.values())
    requests = dict(getattr(getattr(daemon, "fs", None), "requests", {}) or {})
    hits = [int(requests.get(op, 0)) for op in FOPS]
    errors = [0] * len(FOPS)
    latency = [0] * len(FOPS)
    read = FOPS.index("read")
    hits[read] = sum(int(i.metrics.read_count) for i in chosen)
    errors[read] = sum(int(i.metrics.read_errors) for i in chosen)
    latency[read] = int(sum(i.metrics.read_seconds for i in chosen) * 1_000_000)
    sizes, latencies = [0] * BLOCK_READ_SIZES, [0] * READ_LATENCY_RANGES
    for i in chosen:
        with i.metrics.lock:
            sizes = [a + b for a, b in zip(sizes, i.metrics.block_count_read)]
            latencies = [a + b for a, b in zip(latencies, i.metrics.read_latency_dist)]
    pattern = any(getattr(getattr(i, "access", None), "pattern", False) for i in chosen)
    files = any(getattr(getattr(i, "access", None), "files", False) for i in chosen)
    return {"files_account_enabled": files, "access_pattern_enabled": pattern, "measure_latency": True,
            "id": only or "", "data_read": sum(int(i.metrics.read_bytes) for i in chosen),
            "block_count_read": sizes, "fop_hits": hits, "fop_errors": errors,
            "fop_cumulative_latency_total": latency, "read_latency_dist": latencies, "nr_opens": 0,
            "nr_max_opens": 0, "last_fop_tp": 0}


def _named_instances(daemon: Any) -> dict[str, Any]:
    insts = daemon.fs.instances() if getattr(daemon, "fs", None) else {}
    return {("/" + k if k not in ("", "root") else "/"): v for k, v in insts.items()}


def _one_instance(daemon: Any, only: str | None) -> tuple[str, Any]:
    """The instance ``id`` names, or the only one mounted when no ``id`` is given — upstream's
    rule for the per-filesystem metrics (else its ``NoCounter`` 404)."""
    named = _named_instances(daemon)
    if only:
        if only not in named:
            raise NotFound(f"no instance mounted at {only}")
        return only, named[only]
    if len(named) != 1:
        raise NotFound(f"{len(named)} instances are mounted: name one with ?id=/<instance>")
    return next(iter(named.items()))


def backend_metrics(daemon: Any, only: str | None) -> dict:
    """Upstream's ``BackendMetrics`` of one instance's storage backend (``read_count`` counts
    failed reads too, latencies in milliseconds, upstream's size and latency classes)."""
    _, inst = _one_instance(daemon, only)
    m = inst.device.metrics
    errors = int(m.backend_read_errors.value)
    out = {"backend_type": DaemonConfig.parse(inst.config).backend_type,
           "read_count": int(m.backend_read_count.value) + errors, "read_errors": errors,
           "read_amount_total": int(m.backend_read_bytes.value)}
    out.update(m.backend_dist.snapshot())
    return out


def blobcache_metrics(daemon: Any, only: str | None) -> dict:
    """Upstream's ``BlobcacheMetrics`` of one instance's blob cache (404 without a file cache).

    Hits are counted per chunk here: ``whole_hits`` = chunks served from the cache, ``total`` =
    chunks read (hits + fetched), ``partial_hits`` 0 (a chunk is ready or not);
    ``buffered_backend_size`` is 0 (no such buffer)."""
    label, inst = _one_instance(daemon, only)
    cfg = DaemonConfig.parse(inst.config)
    report = getattr(inst.device, "cache_report", None)
    if cfg.cache_type not in ("blobcache", "filecache") or report is None:
        raise NotFound(f"instance {label} has no blob cache (device.cache.type {cfg.cache_type or 'none'!r})")
    rep = report()
    m = inst.device.metrics
    hits, misses = int(m.cache_hits.value), int(m.cache_misses.value)
    begin, end = rep["prefetch_begin_ns"], rep["prefetch_end_ns"]
    return {"underlying_files": rep["underlying_files"], "store_path": rep["store_path"],
            "partial_hits": 0, "whole_hits": hits, "total": hits + misses,
            "entries_count": rep["entries_count"], "prefetch_data_amount": int(m.prefetch_bytes.value),
            "prefetch_requests_count": int(m.prefetch_requests.value),
            "prefetch_workers": rep["prefetch_workers"],
            "prefetch_unmerged_chunks": rep["prefetch_unmerged_chunks"],
            "prefetch_cumulative_time_millis": rep["prefetch_cumulative_time_millis"],
            "prefetch_begin_time_secs": begin // 1_000_000_000,
            "prefetch_begin_time_millis": begin // 1_000_000 % 1000,
            "prefetch_end_time_secs": end // 1_000_000_000, "prefetch_end_time_millis": end // 1_000_000 % 1000,
            "buffered_backend_size": 0, "data_all_ready": rep["data_all_ready"]}


def files_metrics(daemon: Any, only: str | None, latest: bool) -> Any:
    """``/api/v1/metrics/files``: with ``latest=true`` the inodes read since the last such call
    (``latest_read_files``; ``[]`` when it is off, as upstream); else upstream's per-file
    counters (``iostats_files``): inode number -> ``InodeIoStats`` (reads only: ``total_fops``,
    ``data_read``, ``block_count_read``, the ``read`` slot of ``fop_hits``/``fop_errors``);
    ``{}`` when they are off, as upstream."""
    _, inst = _one_instance(daemon, only)
    access = getattr(inst, "access", None)
    if latest:
        return access.take_latest() if access is not None and access.latest else []
    return access.file_stats() if access is not None and access.files else {}


def access_patterns(daemon: Any, only: str | None) -> list:
    """``/api/v1/metrics/pattern``: upstream's ``AccessPattern`` list (``access_pattern``;
    ``[]`` when it is off, as upstream)."""
    _, inst = _one_instance(daemon, only)
    access = getattr(inst, "access", None)
    return access.patterns() if access is not None and access.pattern else []


def inflight(daemon: Any) -> list | None:
    """``/api/v1/metrics/inflight``: the FUSE requests being served; None (204) when none."""
    get = getattr(daemon, "inflight", None)
    ops = get() if get is not None else None
    if ops is None:
        raise NotServed("in-flight FUSE requests are known only to the own FUSE loop (--fuse-impl ll)")
    return ops or None


def _blobs_v2(method: str, query: dict[str, str]) -> tuple[int, Any]:
    """``/api/v2/blobs``: upstream's blob-object API of fscache mode. Answered as upstream
    nydusd answers it in fusedev mode: a 400 for a request missing its parameters, deleting a
    blob file (``blob_id`` only) is a no-op 204, the rest is 501 (``DaemonAbnormal(Unsupported)``)."""
    why = "fscache blob objects (/api/v2/blobs) are not served: this nydusd has no fscache mode"
    if method == "GET":
        if "domain_id" not in query:
            raise ConfigError("GET /api/v2/blobs: query parameter 'domain_id' is required")
        raise NotServed(f"GetBlobObjects(DaemonAbnormal(Unsupported)): {why}")
    if method in ("PUT", "POST"):
        raise NotServed(f"CreateBlobObject(DaemonAbnormal(Unsupported)): {why}")
    if method == "DELETE":
        if "domain_id" in query:
            raise NotServed(f"DeleteBlobObject(DaemonAbnormal(Unsupported)): {why}")
        if "blob_id" in query:
            return 204, None  # upstream's fusedev daemon: no fscache cache to cull
        raise ConfigError("DELETE /api/v2/blobs: query parameter 'domain_id' or 'blob_id' is required")
    return 405, {"code": "NotFound", "message": f"no endpoint {method} /api/v2/blobs"}


def set_log_level(level: Any) -> None:
    if not isinstance(level, str) or level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(_LOG_LEVELS)}, got {level!r}")
    logging.getLogger().setLevel(_LOG_LEVELS[level.lower()])


async def _dispatch(daemon: Any, method: str, target: str, body: bytes,
                    headers: dict[str, str] | None = None) -> tuple[int, Any]:
    url = urllib.parse.urlsplit(target)
    query = dict(urllib.parse.parse_qsl(url.query))
    path = url.path.rstrip("/")
    headers = headers or {}
    if path == "/api/v1/daemon" and method == "GET":
        return 200, upstream_info(daemon)
    if path == "/api/v2/daemon" and method == "GET":  # upstream v2: without the filesystems' info
        return 200, dict(upstream_info(daemon), backend_collection=None)
    if path in ("/api/v1/daemon", "/api/v2/daemon") and method == "PUT":
        req = _json_body(body)
        if "log_level" not in req:
            raise ConfigError("body: expected {\"log_level\": LEVEL}")
        set_log_level(req["log_level"])
        return 204, None
    if path == "/api/v1/daemon/events" and method == "GET":
        from storage.metrics import EVENTS

        return 200, EVENTS.export()
    if path == "/api/v1/config" and method == "GET":
        return 200, daemon.runtime_config(query.get("id"))
    if path == "/api/v1/config" and method == "PUT":
        daemon.update_config(query.get("id"), _json_body(body))
        await daemon.resend_handover()  # a successor starts with the new values
        return 204, None
    if path == "/api/v1/daemon/backend" and method == "GET":
        return 200, await trio.to_thread.run_sync(backend_info, daemon, query.get("mountpoint"))
    if path == "/api/v1/mount":
        mountpoint = query.get("mountpoint")
        if not mountpoint:
            raise ConfigError("query parameter 'mountpoint' is required")
        if method in ("POST", "PUT"):
            req = _json_body(body)
            if req.get("fs_type", "rafs") != "rafs":
                raise ConfigError(f"fs_type: only 'rafs' is supported, got {req.get('fs_type')!r}")
            source = req.get("source")
            if not isinstance(source, str) or not source or "\0" in source:
                raise ConfigError("source: the bootstrap path is required")
            config = req.get("config") or {}
            if not isinstance(config, (dict, str)):
                raise ConfigError(f"config: expected a JSON object or its text, got {type(config).__name__}")
            if method == "PUT":  # upstream's remount: the instance's new bootstrap and config
                await daemon.remount_instance(mountpoint, source, config)
            else:
                await daemon.mount_instance(mountpoint, source, config)
            return 204, None
        if method == "DELETE":
            await daemon.umount_instance(mountpoint)
            return 204, None
    if path == "/api/v1/prefetch" and method in ("POST", "PUT"):
        req = _json_body(body)
        files = req.get("files")
        if files is not None and not (isinstance(files, list) and all(isinstance(f, str) and "\0" not in f
                                                                     for f in files)):
            raise ConfigError("files: expected a list of paths")
        await daemon.prefetch(query.get("mountpoint", "/"), files)
        return 202, None
    if path == "/api/v1/trace" and method == "GET":
        mountpoint = query.get("mountpoint", "/")
        return 200, await trio.to_thread.run_sync(daemon.trace_text, mountpoint)
    if path == "/api/v1/metrics" and method == "GET":
        accept = headers.get("accept", "")
        if query.get("format") == "prometheus" or ("text/plain" in accept and "json" not in accept):
            return 200, daemon.metrics_text(query.get("id"))
        return 200, fs_metric(daemon, query.get("id"))
    if path in ("/api/v1/metrics/backend", "/api/v1/metrics/blobcache") and method == "GET":
        accept = headers.get("accept", "")
        if query.get("format") == "prometheus" or ("text/plain" in accept and "json" not in accept):
            return 200, daemon.metrics_text(query.get("id"), kind=path.rsplit("/", 1)[1])
        if path.endswith("/backend"):
            return 200, backend_metrics(daemon, query.get("id"))
        return 200, await trio.to_thread.run_sync(blobcache_metrics, daemon, query.get("id"))
    if path == "/api/v1/metrics/files" and method == "GET":
        return 200, files_metrics(daemon, query.get("id"), query.get("latest") == "true")
    if path == "/api/v1/metrics/pattern" and method == "GET":
        return 200, access_patterns(daemon, query.get("id"))
    if path == "/api/v1/metrics/inflight" and method == "GET":
        ops = inflight(daemon)
        return (200, ops) if ops else (204, None)
    if path == "/api/v2/blobs":
        return _blobs_v2(method, query)
    if path == "/api/v1/daemon/exit" and method == "PUT":
        handover = query.get("handover")
        if handover in ("1", "true") or (handover is None and daemon.keeps_connection_on_exit()):
            await daemon.send_handover()  # the holder has the newest state before we go
            daemon.prepare_handover_exit()
        elif handover not in (None, "0", "false"):
            raise ConfigError(f"handover: expected 1/true or 0/false, got {handover[:32]!r}")
        return 204, _EXIT
    if path == "/api/v1/daemon/fuse/sendfd" and method == "PUT":
        await daemon.send_handover()
        return 204, None
    if path == "/api/v1/daemon/fuse/takeover" and method == "PUT":
        await daemon.takeover()
        return 204, None
    if path == "/api/v1/daemon/start" and method == "PUT":
        await daemon.start_service()
        return 204, None
    return 404 if method in ("GET", "POST", "PUT", "DELETE") else 405, {
        "code": "NotFound", "message": f"no endpoint {method} {url.path}"}
