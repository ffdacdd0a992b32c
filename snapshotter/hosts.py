"""containerd ``hosts.toml`` directories (``[remote.mirrors_config] dir``), read like upstream.

For registry ``host`` the directory ``<dir>/<host with ":port" as "_port_">``, then
``<dir>/<host>``, then ``<dir>/_default`` is used (the first that exists), and its ``hosts.toml``:

* every ``[host."<url>"]`` table is a mirror, in file order; ``<url>`` without a scheme is https;
  ``header``, ``ping_url``, ``health_check_interval`` (nydus extensions) are honoured;
* ``server = "<url>"`` names the origin endpoint (its scheme: ``http://`` = plain HTTP);
* ``skip_verify = true`` (on a host or at top level) marks the endpoint insecure: TLS is not
  verified, and upstream's plain-HTTP fallback applies — when https fails with a plain-HTTP
  answer or a refused connection, the endpoint is used over http (:func:`snapshotter.remote`).

``capabilities``, ``ca``, ``client`` and ``override_path`` are read but not acted on.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from snapshotter.errors import ConfigError


@dataclass(frozen=True, slots=True)
class HostEndpoint:
    """One endpoint of a ``hosts.toml``."""

    scheme: str                          #: http | https
    host: str                            #: host[:port]
    explicit_scheme: bool = False        #: the file wrote the scheme (no plain-HTTP fallback needed)
    skip_verify: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    ping_url: str = ""
    health_check_interval: float = 5.0

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"


@dataclass(frozen=True, slots=True)
class HostsConfig:
    """The parsed ``hosts.toml`` for one registry host."""

    path: str
    mirrors: tuple[HostEndpoint, ...] = ()
    server: HostEndpoint | None = None


def host_directory(host: str) -> str:
    """``"h:5000"`` → ``"h_5000_"`` (containerd's directory name for a port)."""
    idx = host.rfind(":")
    return f"{host[:idx]}_{host[idx + 1:]}_" if idx > 0 else host


def host_dir(root: str, host: str) -> str | None:
    candidates = [host_directory(host)] if host_directory(host) != host else []
    for name in [*candidates, host, "_default"]:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def _endpoint(url: str, table: dict, where: str, default_skip: bool) -> HostEndpoint:
    explicit = url.startswith(("http://", "https://"))
    parts = urlsplit(url if explicit else "https://" + url)
    if not parts.netloc:
        raise ConfigError(f"{where}: cannot parse server {url!r}")
    headers: dict[str, str] = {}
    for key, value in (table.get("header") or {}).items():
        if isinstance(value, list):
            value = value[0] if value else ""
        if not isinstance(value, str):
            raise ConfigError(f"{where}: header {key!r}: expected a string or a list of strings")
        headers[str(key)] = value
    skip = table.get("skip_verify", default_skip)
    interval = table.get("health_check_interval", 0) or 5
    if not isinstance(skip, bool) or isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise ConfigError(f"{where}: skip_verify must be true/false, health_check_interval a number")
    return HostEndpoint(scheme=parts.scheme, host=parts.netloc, explicit_scheme=explicit, skip_verify=skip,
                        headers=headers, ping_url=str(table.get("ping_url", "")),
                        health_check_interval=float(interval))


def load_hosts(root: str, host: str) -> HostsConfig | None:
    """The ``hosts.toml`` configuration for registry ``host`` under ``root``; None without one."""
    if not root:
        return None
    directory = host_dir(root, host)
    if directory is None:
        return None
    path = os.path.join(directory, "hosts.toml")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return HostsConfig(path=path)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"remote.mirrors_config.dir: {path}: {exc}") from exc
    top_skip = data.get("skip_verify", False)
    hosts = data.get("host") or {}
    if not isinstance(hosts, dict) or not isinstance(top_skip, bool):
        raise ConfigError(f"remote.mirrors_config.dir: {path}: [host] must be tables, skip_verify true/false")
    mirrors = tuple(_endpoint(url, table if isinstance(table, dict) else {}, f"{path}: host {url!r}", False)
                    for url, table in hosts.items() if url)
    server = data.get("server")
    origin = _endpoint(server, data, f"{path}: server", top_skip) if isinstance(server, str) and server else None
    return HostsConfig(path=path, mirrors=mirrors, server=origin)
