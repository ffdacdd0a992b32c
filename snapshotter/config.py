"""The snapshotter configuration: a TOML file like upstream's ``config.toml`` (``version = 1``).

Every key is a field of one of the frozen dataclasses below (defaults documented there and
asserted by ``tests/test_snapshotter_config.py``). Unknown keys and wrong types are a
:class:`ConfigError` naming the key, raised at start — never silently ignored.

Upstream's file (containerd/nydus-snapshotter ``misc/snapshotter/config.toml``) loads unchanged:
its top-level ``daemon_mode`` (``multiple`` = ``dedicated``), ``recover_policy = "failover"``,
``[remote.mirrors_config] dir`` and ``[daemon] nydusd_path`` are honoured; keys of features not
built here (:data:`UNSUPPORTED_KEYS`, :data:`UNSUPPORTED_SECTIONS`) are accepted and reported in
:attr:`Config.warnings`, one line per key, which the CLI logs at start.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import tomllib

from snapshotter.errors import ConfigError
from storage.backend.credentials import parse_duration
from storage.demand import BURST_CAP, BURST_FRACTION, DEMAND_SHARE
from storage.errors import ConfigError as StorageConfigError

DEFAULT_ROOT = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus"
DEFAULT_ADDRESS = "/run/containerd-nydus/containerd-nydus-grpc.sock"

FS_DRIVERS = ("fusedev", "erofs", "fscache")
DAEMON_MODES = ("shared", "dedicated")
#: upstream's top-level ``daemon_mode`` values → ours (``none`` = no nydusd is not built here)
UPSTREAM_DAEMON_MODES = {"multiple": "dedicated", "dedicated": "dedicated", "shared": "shared"}
RECOVER_POLICIES = ("none", "restart", "failover")
FAILOVER_POLICIES = ("resend", "flush")

#: upstream keys accepted but not acted on (features not built here): one warning each
UNSUPPORTED_KEYS = frozenset({
    "uid", "gid",
    "daemon.nydusimage_path", "daemon.log_rotation_size",
    "log.log_to_stdout", "log.dir", "log.log_rotation_compress", "log.log_rotation_local_time",
    "log.log_rotation_max_age", "log.log_rotation_max_backups", "log.log_rotation_max_size",
    "metrics.collect_interval",
    "remote.auth.enable_kubeconfig_keychain", "remote.auth.kubeconfig_path", "remote.auth.enable_cri_keychain",
    "remote.auth.image_service_address",
    "remote.convert_vpc_registry",
    "snapshot.enable_nydus_overlayfs", "snapshot.nydus_overlayfs_path", "snapshot.enable_kata_volume",
    "cache_manager.gc_period",
    "experimental.enable_stargz", "experimental.enable_index_detect", "experimental.enable_backend_source",
})
#: upstream sections whose every key is accepted but not acted on
UNSUPPORTED_SECTIONS = frozenset({"system.debug", "cgroup", "image", "experimental.tarfs"})
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """``[daemon]``: how RAFS instances are served."""

    fs_driver: str = "erofs"            #: fusedev | erofs | fscache
    daemon_mode: str = "shared"         #: shared (one daemon, many instances) | dedicated (one per image)
    nydusd_config: str = ""             #: path of a nydusd JSON template; "" = built-in template
    recover_policy: str = "failover"    #: none | restart (remount: running containers lose the mount) | failover (FUSE session held)
    threads_number: int = 0             #: nydusd --thread-num (FUSE workers per daemon); 0 = nydusd's default (2)
    nydusd_path: str = ""               #: nydusd executable; "" (or missing file, with a warning) = the bundled one
    failover_policy: str = "resend"     #: failover: requests the dead daemon had taken are resent | flush (EIO)
    cgroup: str = ""                    #: cgroup (under each hierarchy root) daemons move to, outliving the snapshotter's container; "" = stay


@dataclass(frozen=True, slots=True)
class RegistryAuth:
    """``[remote.auths."<host>"]``: static credentials for one registry host."""

    username: str = ""
    password: str = ""
    auth: str = ""                       #: base64("user:password"), instead of username/password


@dataclass(frozen=True, slots=True)
class MirrorsDirConfig:
    """``[remote.mirrors_config]``: containerd ``hosts.toml`` directories (upstream's key)."""

    dir: str = ""                        #: ``<dir>/<host>/hosts.toml``; "" = off


@dataclass(frozen=True, slots=True)
class RemoteAuthConfig:
    """``[remote.auth]`` (upstream's keys): kubelet exec credential providers."""

    enable_kubelet_credential_providers: bool = False
    credential_provider_config: str = ""     #: a kubelet CredentialProviderConfig (JSON or YAML)
    credential_provider_bin_dir: str = ""    #: where the plugins named there are
    #: upstream's: every so often (a Go duration; "0s" off) ask the renewable credential sources
    #: (kubelet providers, docker config and its helpers) again for each running instance's image
    #: and hand changed credentials to its nydusd (``PUT /api/v1/config``), no remount
    credential_renewal_interval: str = "0s"

    @property
    def renewal_seconds(self) -> float:
        return parse_duration(self.credential_renewal_interval, "remote.auth.credential_renewal_interval")


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """``[remote]``: how daemons reach registries."""

    insecure_registries: tuple[str, ...] = ()   #: hosts spoken to over plain http
    skip_ssl_verify: bool = False
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: ``host = ["http://mirror:5000", ...]``: endpoints tried instead of the image's host
    auths: Mapping[str, RegistryAuth] = field(default_factory=dict)
    docker_config: str = ""             #: docker config.json (credHelpers, credsStore, auths); "" = $DOCKER_CONFIG or ~/.docker
    check_registry: bool = True         #: probe ``/v2/`` before mounting (fail fast when unreachable)
    timeout: int = 5                    #: seconds, per backend request
    connect_timeout: int = 5
    retry_limit: int = 2
    mirrors_config: MirrorsDirConfig = field(default_factory=MirrorsDirConfig)
    auth: RemoteAuthConfig = field(default_factory=RemoteAuthConfig)


@dataclass(frozen=True, slots=True)
class CacheManagerConfig:
    """``[cache_manager]``: the local blob cache shared by all instances."""

    disable: bool = False               #: no cache (every read goes to the registry)
    cache_dir: str = ""                 #: "" = <root>/cache
    size_limit: int = 0                 #: bytes (or "10GiB" in the file); 0 = unlimited
    gc_on_cleanup: bool = True          #: Cleanup deletes cache files of blobs no snapshot uses


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """``[prefetch]``: background fetch of image data after mount."""

    enable: bool = True
    prefetch_all: bool = False          #: whole blobs, not only the image's prefetch list
    threads_count: int = 4
    merging_size: int = 1048576         #: bytes merged into one backend request
    bandwidth_rate: int = 0             #: bytes/s, 0 = unlimited
    record_trace: bool = False          #: daemons record each image's prefetch trace (nydusctl trace)
    runtime_files: bool = True          #: fetch user db, loader, ld.so.cache, libc at mount (rafs.runtime)
    burst_cap: float = BURST_CAP        #: s of unbroken on-demand reads after which prefetch ...
    burst_fraction: float = BURST_FRACTION  #: ... shares the link, once demand read this much of the image
    demand_share: int = DEMAND_SHARE    #: prefetch requests beside sustained demand; 0 = always wait


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``."""

    level: str = "info"                 #: trace|debug|info|warn|error
    format: str = "text"                #: text | json (one JSON object per line)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``."""

    address: str = ""                   #: "host:port" for the Prometheus endpoint; "" = off
    #: upstream's: a FUSE request in flight this long counts in ``nydusd_hung_io_counts``
    hung_io_interval: str = "10s"

    @property
    def hung_io_seconds(self) -> float:
        return parse_duration(self.hung_io_interval, "metrics.hung_io_interval")


@dataclass(frozen=True, slots=True)
class SystemConfig:
    """``[system]`` (upstream's keys): the system controller (``GET /api/v1/daemons``,
    ``PUT /api/v1/daemons/upgrade``) on a unix socket (mode 0600)."""

    enable: bool = True
    address: str = ""                   #: socket path; "" = <root>/system.sock


@dataclass(frozen=True, slots=True)
class SnapshotConfig:
    """``[snapshot]``: overlay details."""

    sync_remove: bool = True            #: delete a snapshot's directory in Remove (else in Cleanup)
    enable_overlayfs_volatile: bool = False


@dataclass(frozen=True, slots=True)
class ExperimentalConfig:
    """``[experimental]``."""

    #: serve a plain OCI image lazily when a nydus image is attached to it as an OCI referrer
    enable_referrer_detect: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file."""

    version: int = 1
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    socket_group: str = ""              #: group (name or gid) allowed on the socket (0660); "" = 0600
    cleanup_on_close: bool = False      #: unmount every RAFS instance on shutdown
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    cache_manager: CacheManagerConfig = field(default_factory=CacheManagerConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)
    #: one line per accepted-but-unsupported upstream key (not a file key)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def system_address(self) -> str:
        return self.system.address or os.path.join(self.root, "system.sock")

    @property
    def cache_dir(self) -> str:
        return self.cache_manager.cache_dir or os.path.join(self.root, "cache")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KI": 1024, "KIB": 1024, "M": 1000**2, "MB": 1000**2,
          "MI": 1024**2, "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GI": 1024**3, "GIB": 1024**3,
          "T": 1000**4, "TB": 1000**4, "TI": 1024**4, "TIB": 1024**4}


def parse_size(value: object, where: str) -> int:
    """``1048576`` or ``"10GiB"`` → bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: size must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    raise ConfigError(f"{where}: expected a size like 1048576 or \"10GiB\", got {value!r}")


def _convert(tp: Any, value: object, where: str) -> object:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f'{where}."{k}"') for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type, data: Mapping[str, object], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"warnings"}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown configuration key {prefix}{unknown[0]!s}"
                          f" (known: {', '.join(sorted(names))})")
    kwargs: dict[str, object] = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if cls is CacheManagerConfig and name == "size_limit":
            kwargs[name] = parse_size(value, key)
        else:
            kwargs[name] = _convert(hints[name], value, key)
    return cls(**kwargs)


def _validate(cfg: Config) -> Config:
    ra = cfg.remote.auth
    try:
        ra.renewal_seconds
        cfg.metrics.hung_io_seconds
    except StorageConfigError as exc:
        raise ConfigError(str(exc)) from None
    if ra.enable_kubelet_credential_providers and not (ra.credential_provider_config
                                                       and ra.credential_provider_bin_dir):
        raise ConfigError("remote.auth.enable_kubelet_credential_providers: needs credential_provider_config "
                          "and credential_provider_bin_dir")
    if cfg.version != 1:
        raise ConfigError(f"version: unsupported configuration version {cfg.version} (want 1)")
    if cfg.daemon.fs_driver not in FS_DRIVERS:
        raise ConfigError(f"daemon.fs_driver: {cfg.daemon.fs_driver!r} is not one of {', '.join(FS_DRIVERS)}")
    if cfg.daemon.daemon_mode not in DAEMON_MODES:
        raise ConfigError(f"daemon.daemon_mode: {cfg.daemon.daemon_mode!r} is not one of {', '.join(DAEMON_MODES)}")
    if cfg.daemon.recover_policy not in RECOVER_POLICIES:
        raise ConfigError(f"daemon.recover_policy: {cfg.daemon.recover_policy!r} is not one of "
                          f"{', '.join(RECOVER_POLICIES)}")
    if cfg.daemon.failover_policy not in FAILOVER_POLICIES:
        raise ConfigError(f"daemon.failover_policy: {cfg.daemon.failover_policy!r} is not one of "
                          f"{', '.join(FAILOVER_POLICIES)}")
    if cfg.daemon.cgroup and any(p in (".", "..") for p in cfg.daemon.cgroup.split("/")):
        raise ConfigError(f"daemon.cgroup: {cfg.daemon.cgroup!r} must not contain '.' or '..'")
    if not 0 <= cfg.daemon.threads_number <= 1024:
        raise ConfigError("daemon.threads_number: must be 0..1024 (0 = nydusd's default)")
    if cfg.log.level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log.level: {cfg.log.level!r} is not one of {', '.join(LOG_LEVELS)}")
    if cfg.log.format not in LOG_FORMATS:
        raise ConfigError(f"log.format: {cfg.log.format!r} is not one of {', '.join(LOG_FORMATS)}")
    if not cfg.root or not os.path.isabs(cfg.root):
        raise ConfigError(f"root: must be an absolute path, got {cfg.root!r}")
    if not cfg.address:
        raise ConfigError("address: must not be empty")
    if cfg.socket_group:
        socket_gid(cfg.socket_group)
    if cfg.metrics.address and ":" not in cfg.metrics.address:
        raise ConfigError(f"metrics.address: expected host:port, got {cfg.metrics.address!r}")
    for host, endpoints in cfg.remote.mirrors.items():
        for ep in endpoints:
            if not ep.startswith(("http://", "https://")):
                raise ConfigError(f'remote.mirrors."{host}": endpoint {ep!r} must start with http:// or https://')
    for name in ("timeout", "connect_timeout", "retry_limit"):
        if getattr(cfg.remote, name) < 0:
            raise ConfigError(f"remote.{name}: must not be negative")
    if cfg.prefetch.threads_count < 1 or cfg.prefetch.merging_size < 0 or cfg.prefetch.bandwidth_rate < 0:
        raise ConfigError("prefetch: threads_count must be >= 1, sizes must not be negative")
    if cfg.prefetch.burst_cap < 0 or not 0 <= cfg.prefetch.burst_fraction <= 1 or cfg.prefetch.demand_share < 0:
        raise ConfigError("prefetch: burst_cap and demand_share must not be negative, burst_fraction must be 0..1")
    return cfg


def socket_gid(group: str) -> int:
    """The gid of ``socket_group`` (a group name or a numeric gid); ConfigError if unknown."""
    import grp  # noqa: PLC0415

    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        raise ConfigError(f"socket_group: no such group {group!r}") from None


def _leaves(value: object, where: str) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{where}.{k}")]
    return [where]


def _upstream(data: Mapping[str, object]) -> tuple[dict[str, Any], list[str]]:
    """Upstream's file → ours: move/translate honoured keys, drop unsupported ones (warnings)."""
    data = json.loads(json.dumps(data, default=str))  # deep copy; TOML dates become strings
    warnings: list[str] = []

    def unsupported(key: str, value: object) -> None:
        for leaf in _leaves(value, key):
            warnings.append(f"configuration key {leaf} is accepted but not supported here (ignored)")

    def walk(table: dict[str, Any], prefix: str) -> None:
        for name in list(table):
            key = f"{prefix}{name}"
            if key in UNSUPPORTED_KEYS or key in UNSUPPORTED_SECTIONS:
                unsupported(key, table.pop(name))
            elif isinstance(table[name], dict) and any(
                    k.startswith(key + ".") for k in UNSUPPORTED_SECTIONS | UNSUPPORTED_KEYS):
                walk(table[name], key + ".")

    walk(data, "")
    if "daemon_mode" in data:            # upstream's place: top level, values multiple|dedicated|shared|none
        mode = data.pop("daemon_mode")
        if mode not in UPSTREAM_DAEMON_MODES:
            raise ConfigError(f"daemon_mode: {mode!r} is not supported here; use one of "
                              f"{', '.join(UPSTREAM_DAEMON_MODES)}")
        daemon = data.setdefault("daemon", {})
        if not isinstance(daemon, dict):
            raise ConfigError("daemon: expected a table")
        ours = UPSTREAM_DAEMON_MODES[mode]
        if daemon.get("daemon_mode", ours) != ours:
            raise ConfigError(f"daemon_mode = {mode!r} contradicts daemon.daemon_mode = "
                              f"{daemon['daemon_mode']!r}; keep one of them")
        daemon["daemon_mode"] = ours
    return data, warnings


def from_dict(data: Mapping[str, object]) -> Config:
    """Build and validate a :class:`Config` from parsed TOML (ours or upstream's)."""
    if "version" not in data:
        raise ConfigError("version: missing (the file must start with `version = 1`)")
    ours, warnings = _upstream(data)
    cfg = _build(Config, ours, "")
    if cfg.daemon.nydusd_path and not os.path.isfile(cfg.daemon.nydusd_path):
        warnings.append(f"daemon.nydusd_path: {cfg.daemon.nydusd_path} does not exist; using the bundled nydusd")
        cfg = cfg.replace(daemon=dataclasses.replace(cfg.daemon, nydusd_path=""))
    return _validate(cfg.replace(warnings=tuple(warnings)))


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc
    return from_dict(data)


def validate(cfg: Config) -> Config:
    """Check a programmatically built config (same rules as the file)."""
    return _validate(cfg)


#: nydusd configuration template used when ``[daemon] nydusd_config`` is empty (upstream schema)
DEFAULT_NYDUSD_CONFIG: dict[str, object] = {
    "device": {
        "backend": {"type": "registry", "config": {}},
        "cache": {"type": "blobcache", "compressed": False, "config": {"work_dir": ""}},
    },
    "mode": "direct",
    # chunk digests are always checked when data enters the cache (and cached data once per daemon
    # before first use); true re-checks every read, at the cost of hashing each chunk read
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    # upstream's template says 1 MiB; with kernel EROFS reading 512 KiB around each page fault,
    # 256 KiB fetched numpy's start 0.9 MB (5 %) lighter and 0.06 s sooner at 20 MB/s, the other
    # start-ups and a whole-image read unchanged (docs/perf.md, 2026-12-07 eighth)
    "amplify_io": 262144,
    "fs_prefetch": {"enable": True, "prefetch_all": False, "threads_count": 4,
                    "merging_size": 1048576, "bandwidth_rate": 0},
}


def nydusd_config(cfg: Config) -> dict[str, Any]:
    """The nydusd JSON template for this config: the file (or built-in), with cache and prefetch set."""
    if cfg.daemon.nydusd_config:
        try:
            with open(cfg.daemon.nydusd_config, encoding="utf-8") as f:
                tmpl = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"daemon.nydusd_config: cannot read {cfg.daemon.nydusd_config}: {exc}") from exc
        if not isinstance(tmpl, dict):
            raise ConfigError(f"daemon.nydusd_config: {cfg.daemon.nydusd_config} is not a JSON object")
    else:
        tmpl = json.loads(json.dumps(DEFAULT_NYDUSD_CONFIG))
    device = tmpl.setdefault("device", {})
    cache = device.setdefault("cache", {})
    if cfg.cache_manager.disable:
        cache.clear()
        cache["type"] = "dummycache"
    else:
        cache.setdefault("type", "blobcache")
        cache_cfg = cache.setdefault("config", {})
        cache_cfg["work_dir"] = cfg.cache_dir
        if cfg.cache_manager.size_limit:
            cache_cfg["limit_size"] = cfg.cache_manager.size_limit  # storage CacheConfig.limit_size
    pf = cfg.prefetch
    tmpl["fs_prefetch"] = {"enable": pf.enable, "prefetch_all": pf.prefetch_all,
                           "threads_count": pf.threads_count, "merging_size": pf.merging_size,
                           "bandwidth_rate": pf.bandwidth_rate, "burst_cap": pf.burst_cap,
                           "burst_fraction": pf.burst_fraction, "demand_share": pf.demand_share,
                           "runtime_files": pf.runtime_files}
    if pf.record_trace:
        tmpl["fs_prefetch"]["record_trace"] = True
    return tmpl
