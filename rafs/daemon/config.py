"""Upstream nydusd JSON configuration (the v1 "RafsConfig" schema the snapshotter writes).

```json
{"device": {"backend": {"type": "registry"|"localfs", "config": {...}},
            "cache": {"type": "blobcache"|"filecache"|"dummycache", "compressed": false,
                      "config": {"work_dir": "...", "disable_indexed_map": false,
                                 "limit_size": 0}}},
 "mode": "direct", "digest_validate": false, "iostats_files": false, "enable_xattr": true,
 "amplify_io": 1048576,
 "fs_prefetch": {"enable": false, "prefetch_all": true, "threads_count": 8,
                 "merging_size": 1048576, "bandwidth_rate": 0, "record_trace": false}}
```
Unknown keys are kept in ``raw`` and ignored, as upstream does. ``digest_validate`` keeps
upstream's meaning, checking every read against the chunk digest; whatever it says, chunks are
checked when they enter the cache from the backend and cached chunks once per daemon before
their first use (``storage.cache.CacheConfig.validate_digest``). ``fs_prefetch.record_trace`` is
ours (upstream ignores it): record which files the image's containers read, in order, for
``GET /api/v1/trace`` (see :mod:`rafs.trace`); ``fs_prefetch.trace_file`` (ours too) is where
the daemon writes that trace when the instance is unmounted. ``fs_prefetch.runtime_files``
(ours, default true) fetches the image's ``/etc/group``, ``/etc/passwd``, dynamic loader,
``/etc/ld.so.cache`` and C library at mount, at once, when prefetch is enabled and the image has no start-up set of its own (see
:mod:`rafs.runtime`).
"""

from __future__ import annotations

import json
import logging
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from rafs.errors import ConfigError
from storage.demand import BURST_CAP, BURST_FRACTION, DEMAND_SHARE

BACKEND_TYPES = ("registry", "localfs")
#: default ``amplify_neighbours``: about one round trip's worth of transfer on a 20 MB/s link
AMPLIFY_NEIGHBOURS = 128 << 10
CACHE_TYPES = ("blobcache", "filecache", "dummycache", "")


#: the one rule for instance names (API mountpoints ``/<name>``, DaemonManager instance ids):
#: a letter or digit, then letters, digits, '.', '_', '-'; at most 255 bytes
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_BYTES = 255


def check_instance_name(name: str, what: str = "instance name") -> str:
    """``name`` if it follows the instance name rule, else :class:`ConfigError` saying why."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what}: must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ConfigError(f"{what}: longer than {MAX_NAME_BYTES} bytes")
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{what} {name[:64]!r}: use a letter or digit, then letters, digits, '.', '_', '-'")
    return name


def loads_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` whose every failure (bad syntax, bad encoding, nesting too deep) is a
    :class:`ConfigError` naming ``what``."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{what}: JSON nested too deeply") from None


_log = logging.getLogger(__name__)
#: upstream ConfigV2 keys read but not acted on here (one warning each when set to a true value)
_V2_IGNORED = ("cache.enable_encryption", "cache.enable_convergent_encryption", "cache.encryption_key")


def from_v2(obj: dict) -> dict:
    """Translate upstream nydusd's ``ConfigV2`` (``version = 2``; TOML or JSON) to the v1 layout
    :meth:`DaemonConfig.parse` reads. ``ConfigError`` names the bad key."""
    backend = _get(obj, "backend", dict, {}, "")
    btype = _get(backend, "type", str, "", "backend.")
    bconf = _get(backend, btype, dict, {}, "backend.") if btype else {}
    cache = _get(obj, "cache", dict, {}, "")
    ctype = _get(cache, "type", str, "", "cache.")
    if ctype == "fscache":
        raise ConfigError("cache.type: 'fscache' is not served by this nydusd (use 'filecache')")
    cconf = dict(_get(cache, ctype, dict, {}, "cache.")) if ctype in ("filecache", "blobcache") else {}
    rafs = _get(obj, "rafs", dict, {}, "")
    pf = _get(rafs, "prefetch", dict, {}, "rafs.")
    for dotted in _V2_IGNORED:
        sect, _, key = dotted.partition(".")
        if {"cache": cache, "rafs": rafs}[sect].get(key):
            _log.warning("nydusd config key %s is accepted but not supported here (ignored)", dotted)
    device: dict = {"backend": {"type": btype, "config": bconf},
                    "cache": {"type": ctype, "config": cconf,
                              "compressed": _get(cache, "compressed", bool, False, "cache.")}}
    if "id" in obj:
        device["id"] = _get(obj, "id", str, "", "")
    out: dict = {"device": device}
    for v2key, v1key, kind in (("mode", "mode", str), ("enable_xattr", "enable_xattr", bool),
                               ("iostats_files", "iostats_files", bool), ("batch_size", "amplify_io", int),
                               ("access_pattern", "access_pattern", bool),
                               ("latest_read_files", "latest_read_files", bool)):
        if v2key in rafs:
            out[v1key] = _get(rafs, v2key, kind, None, "rafs.")
    out["digest_validate"] = (_get(rafs, "validate", bool, False, "rafs.")
                              or _get(cache, "validate", bool, False, "cache."))
    prefetch: dict = {}
    for v2key, v1key in (("enable", "enable"), ("threads", "threads_count"), ("batch_size", "merging_size"),
                         ("bandwidth_limit", "bandwidth_rate"), ("prefetch_all", "prefetch_all")):
        if v2key in pf:
            prefetch[v1key] = pf[v2key]
    if prefetch:
        out["fs_prefetch"] = prefetch
    return out


def _get(obj: dict, key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if kind in (int, (int, float)) and isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """``fs_prefetch``; defaults: disabled, prefetch_all, 8 threads, 1 MiB merging, no rate limit,
    no trace recording."""

    enable: bool = False
    prefetch_all: bool = True
    threads_count: int = 8
    merging_size: int = 1 << 20
    bandwidth_rate: int = 0
    record_trace: bool = False  #: record the prefetch trace (reads in first-access order)
    trace_file: str = ""  #: where the trace is written when the instance is unmounted ("" = not)
    #: our extension: fetch the user db, dynamic loader, ld.so.cache and libc at mount (``rafs.runtime``)
    runtime_files: bool = True
    #: our extension: on-demand reads busy for ``burst_cap`` s without a pause, having read
    #: ``burst_fraction`` of the image, let ``demand_share`` prefetch requests run beside them
    burst_cap: float = BURST_CAP
    burst_fraction: float = BURST_FRACTION
    demand_share: int = DEMAND_SHARE


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """A parsed nydusd config; defaults match upstream nydusd (direct mode, xattrs on)."""

    backend_type: str = ""
    backend_config: dict = field(default_factory=dict)
    cache_type: str = ""
    cache_work_dir: str | None = None
    cache_compressed: bool = False
    disable_indexed_map: bool = False
    cache_limit_size: int = 0  #: ``device.cache.config.limit_size`` bytes; 0 = unlimited (LRU eviction)
    device_id: str = ""
    mode: str = "direct"
    digest_validate: bool = False  #: re-check chunk digests on every read (always checked on entering the cache)
    iostats_files: bool = False
    #: record which files are read (``/api/v1/metrics/pattern``; upstream's key)
    access_pattern: bool = False
    #: record the files read since the last ``/api/v1/metrics/files?latest=true`` (upstream's key)
    latest_read_files: bool = False
    enable_xattr: bool = True
    amplify_io: int = 1 << 20
    #: our extension: a read amplified past the end of its file takes neighbouring files' chunks
    #: only while the request stays within this many bytes (``amplify_io`` bounds the file's own)
    amplify_neighbours: int = AMPLIFY_NEIGHBOURS
    fs_prefetch: PrefetchConfig = PrefetchConfig()
    raw: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: dict | str | bytes) -> "DaemonConfig":
        """Parse a config object or its JSON text; :class:`ConfigError` names the bad field."""
        if isinstance(obj, (str, bytes)):
            obj = loads_json(obj, "nydusd config") if obj else {}
        if not isinstance(obj, dict):
            raise ConfigError(f"nydusd config must be a JSON object, got {type(obj).__name__}")
        if "version" in obj:
            if obj["version"] != 2 or isinstance(obj["version"], bool):
                raise ConfigError(f"version: only 2 (upstream ConfigV2) or no version (v1), got {obj['version']!r}")
            return cls.parse(from_v2(obj))  # raw = the v1 translation (what storage reads)
        device = _get(obj, "device", dict, {}, "")
        backend = _get(device, "backend", dict, {}, "device.")
        btype = _get(backend, "type", str, "", "device.backend.")
        if btype and btype not in BACKEND_TYPES:
            raise ConfigError(
                f"device.backend.type: unsupported backend {btype!r} (supported: {', '.join(BACKEND_TYPES)})"
            )
        bconf = _get(backend, "config", dict, {}, "device.backend.")
        cache = _get(device, "cache", dict, {}, "device.")
        ctype = _get(cache, "type", str, "", "device.cache.")
        if ctype not in CACHE_TYPES:
            raise ConfigError(
                f"device.cache.type: unsupported cache {ctype!r} (supported: blobcache, filecache, dummycache)"
            )
        cconf = _get(cache, "config", dict, {}, "device.cache.")
        limit = _get(cconf, "limit_size", int, 0, "device.cache.config.")
        if limit < 0:
            raise ConfigError(f"device.cache.config.limit_size: must be >= 0, got {limit}")
        mode = _get(obj, "mode", str, "direct", "")
        if mode not in ("direct", "cached"):
            raise ConfigError(f"mode: expected 'direct' or 'cached', got {mode!r}")
        pf = _get(obj, "fs_prefetch", dict, {}, "")
        prefetch = PrefetchConfig(
            enable=_get(pf, "enable", bool, False, "fs_prefetch."),
            prefetch_all=_get(pf, "prefetch_all", bool, True, "fs_prefetch."),
            threads_count=_get(pf, "threads_count", int, 8, "fs_prefetch."),
            merging_size=_get(pf, "merging_size", int, 1 << 20, "fs_prefetch."),
            bandwidth_rate=_get(pf, "bandwidth_rate", int, 0, "fs_prefetch."),
            record_trace=_get(pf, "record_trace", bool, False, "fs_prefetch."),
            trace_file=_get(pf, "trace_file", str, "", "fs_prefetch."),
            runtime_files=_get(pf, "runtime_files", bool, True, "fs_prefetch."),
            burst_cap=float(_get(pf, "burst_cap", (int, float), BURST_CAP, "fs_prefetch.")),
            burst_fraction=float(_get(pf, "burst_fraction", (int, float), BURST_FRACTION, "fs_prefetch.")),
            demand_share=_get(pf, "demand_share", int, DEMAND_SHARE, "fs_prefetch."),
        )
        if prefetch.threads_count < 0:
            raise ConfigError(f"fs_prefetch.threads_count: must be >= 0, got {prefetch.threads_count}")
        if prefetch.burst_cap < 0 or not 0 <= prefetch.burst_fraction <= 1 or prefetch.demand_share < 0:
            raise ConfigError("fs_prefetch: burst_cap and demand_share must be >= 0, burst_fraction 0..1; got "
                              f"{prefetch.burst_cap}, {prefetch.demand_share}, {prefetch.burst_fraction}")
        return cls(
            backend_type=btype,
            backend_config=bconf,
            cache_type=ctype,
            cache_work_dir=_get(cconf, "work_dir", str, None, "device.cache.config."),
            cache_compressed=_get(cache, "compressed", bool, False, "device.cache."),
            disable_indexed_map=_get(cconf, "disable_indexed_map", bool, False, "device.cache.config."),
            cache_limit_size=limit,
            device_id=_get(device, "id", str, "", "device."),
            mode=mode,
            digest_validate=_get(obj, "digest_validate", bool, False, ""),
            iostats_files=_get(obj, "iostats_files", bool, False, ""),
            access_pattern=_get(obj, "access_pattern", bool, False, ""),
            latest_read_files=_get(obj, "latest_read_files", bool, False, ""),
            enable_xattr=_get(obj, "enable_xattr", bool, True, ""),
            amplify_io=_get(obj, "amplify_io", int, 1 << 20, ""),
            amplify_neighbours=_get(obj, "amplify_neighbours", int, AMPLIFY_NEIGHBOURS, ""),
            fs_prefetch=prefetch,
            raw=obj,
        )

    @classmethod
    def load(cls, path: str) -> "DaemonConfig":
        """A v1 JSON, a v2 JSON or a v2 TOML (upstream ``ConfigV2``) config file."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read nydusd config {path}: {exc}") from exc
        if path.endswith(".toml") or not data.lstrip().startswith(b"{"):
            try:
                return cls.parse(tomllib.loads(data.decode("utf-8")))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"nydusd config {path}: not TOML: {exc}") from None
        return cls.parse(data)
