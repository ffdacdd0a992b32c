"""Build a backend from nydusd's JSON: ``device.backend = {"type": ..., "config": {...}}``.

Types: ``registry`` (keys: scheme, host, repo, auth, registry_token, skip_verify, ca_cert_files,
timeout, connect_timeout, retry_limit, proxy{url,fallback,ping_url,check_interval,use_http},
mirrors[{host,headers,ping_url,health_check_interval,auth_through}]) and ``localfs`` (dir,
blob_file). Unknown keys nydusd also accepts (``blob_url_scheme``, ``blob_redirected_host``) are
ignored; a wrong type names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from storage.backend.base import DEFAULT_RETRY_LIMIT, BlobBackend
from storage.backend.localfs import LocalFsBackend
from storage.backend.registry import MirrorConfig, ProxyConfig, RegistryBackend, RegistryConfig
from storage.errors import ConfigError
from storage.metrics import StorageMetrics


def _get(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    value = cfg.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def registry_config(cfg: Mapping[str, Any]) -> RegistryConfig:
    """Parse a registry ``config`` object into :class:`RegistryConfig`."""
    w = "backend.config"
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{w}: expected an object, got {cfg!r}")
    proxy = None
    p = cfg.get("proxy")
    if p:
        if not isinstance(p, Mapping):
            raise ConfigError(f"{w}.proxy: expected an object, got {p!r}")
        proxy = ProxyConfig(
            url=_get(p, "url", str, "", f"{w}.proxy"),
            fallback=_get(p, "fallback", bool, True, f"{w}.proxy"),
            ping_url=_get(p, "ping_url", str, "", f"{w}.proxy"),
            check_interval=_get(p, "check_interval", float, 5.0, f"{w}.proxy"),
            use_http=_get(p, "use_http", bool, False, f"{w}.proxy"),
        )
    mirrors = []
    for i, m in enumerate(_get(cfg, "mirrors", list, [], w)):
        where = f"{w}.mirrors[{i}]"
        if not isinstance(m, Mapping) or not m.get("host"):
            raise ConfigError(f"{where}: expected an object with 'host', got {m!r}")
        mirrors.append(MirrorConfig(
            host=_get(m, "host", str, "", where),
            headers=dict(_get(m, "headers", dict, {}, where)),
            ping_url=_get(m, "ping_url", str, "", where),
            health_check_interval=_get(m, "health_check_interval", float, 5.0, where),
            auth_through=_get(m, "auth_through", bool, False, where),
        ))
    host = _get(cfg, "host", str, "", w)
    repo = _get(cfg, "repo", str, "", w)
    if not host:
        raise ConfigError(f"{w}.host: required for a registry backend")
    if not repo:
        raise ConfigError(f"{w}.repo: required for a registry backend")
    scheme = _get(cfg, "scheme", str, "https", w) or "https"
    if scheme not in ("http", "https"):
        raise ConfigError(f"{w}.scheme: expected 'http' or 'https', got {scheme!r}")
    ca = _get(cfg, "ca_cert_files", list, [], w)
    if not all(isinstance(x, str) for x in ca):
        raise ConfigError(f"{w}.ca_cert_files: expected a list of paths, got {ca!r}")
    return RegistryConfig(
        host=host, repo=repo, scheme=scheme,
        auth=_get(cfg, "auth", str, "", w),
        registry_token=_get(cfg, "registry_token", str, "", w),
        skip_verify=_get(cfg, "skip_verify", bool, False, w),
        ca_cert_files=tuple(ca),
        timeout=_get(cfg, "timeout", float, 5.0, w),
        connect_timeout=_get(cfg, "connect_timeout", float, 5.0, w),
        retry_limit=_get(cfg, "retry_limit", int, DEFAULT_RETRY_LIMIT, w),
        proxy=proxy,
        mirrors=tuple(mirrors),
        docker_config=_get(cfg, "docker_config", str, None, w),
    )


def backend_from_config(config: Mapping[str, Any], *, metrics: StorageMetrics | None = None) -> BlobBackend:
    """A backend from ``{"type", "config"}``, or from a whole nydusd config (``device.backend``)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"backend: expected an object, got {config!r}")
    if "device" in config:
        device = config["device"]
        if not isinstance(device, Mapping) or "backend" not in device:
            raise ConfigError("device.backend: missing")
        config = device["backend"]
    kind = config.get("type")
    cfg = config.get("config", {})
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"backend.config: expected an object, got {cfg!r}")
    if kind == "registry":
        return RegistryBackend(registry_config(cfg), metrics=metrics)
    if kind == "localfs":
        return LocalFsBackend(dir=_get(cfg, "dir", str, None, "backend.config"),
                              blob_file=_get(cfg, "blob_file", str, None, "backend.config"),
                              metrics=metrics)
    raise ConfigError(f"backend.type: expected 'registry' or 'localfs', got {kind!r}")
