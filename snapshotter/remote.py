"""Registry settings of a nydus image: the nydusd ``device.backend`` the snapshotter hands to the
``DaemonManager``, built on storage's registry code.

* host and repository from the image reference label (``cri.image-ref``);
* scheme ``http`` for ``[remote] insecure_registries``;
* mirrors from ``[remote.mirrors]`` and from containerd ``hosts.toml`` directories
  (``[remote.mirrors_config] dir``, :mod:`snapshotter.hosts`), passed to nydusd as ``mirrors[]``:
  storage's ``RegistryBackend`` tries them in order before the origin, with its health checks;
  a hosts.toml ``server = "http://..."`` makes the origin plain HTTP;
* upstream's plain-HTTP fallback: an endpoint marked insecure (hosts.toml ``skip_verify``)
  without an explicit scheme is probed over https, and used over http when https gets a
  plain-HTTP answer or a refused connection (:func:`plain_http_fallback`);
* credentials: the pull labels, then ``[remote.auths]``, then docker's ``config.json`` and its
  credential helpers (:mod:`storage.backend.credentials`, the module nydusd and nydusify use);
* with ``check_registry``, :func:`check_reachable` asks storage's ``RegistryBackend.ping`` whether
  some endpoint answers, with the same mirror failover as reads; a container's Prepare runs it
  as a :class:`ReachabilityProbe` beside the instance mount and checks it before answering.

Secrets never reach a log line or an error message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.errors import ConfigError
from snapshotter.hosts import HostEndpoint, load_hosts
from snapshotter.errors import FailedPrecondition, Unavailable
from storage.backend.credentials import CredentialProviders, Credentials, docker_config_credentials
from storage.backend.registry import MirrorConfig, RegistryBackend, RegistryClient, RegistryConfig
from storage.errors import ConfigError as StorageConfigError
from storage.errors import CredentialError, RegistryUnavailable, StorageError

log = logging.getLogger("snapshotter")

#: ``ping(scheme, host, timeout)`` → None when ``scheme://host/v2/`` answers, else the error text
Ping = Callable[[str, str, float], "str | None"]


_PROVIDERS: dict[tuple[str, str], CredentialProviders] = {}


def _providers(config_path: str, bin_dir: str) -> CredentialProviders:
    """One :class:`CredentialProviders` (and so one response cache) per config for the process."""
    key = (config_path, bin_dir)
    if key not in _PROVIDERS:
        _PROVIDERS[key] = CredentialProviders.load(config_path, bin_dir)
    return _PROVIDERS[key]


#: credential sources a renewal asks again (upstream's renewable providers): the pull's own labels
#: and the static ``[remote.auths]`` cannot change while an instance runs
RENEWABLE_SOURCES = ("kubelet", "docker")


def registry_credentials(host: str, labels: Mapping[str, str], cfg: Config) -> Credentials | None:
    """Credentials for ``host``: labels, then ``[remote.auths]``, then kubelet credential providers
    (``[remote.auth]``, for the image in the labels), then docker config (helpers too)."""
    return resolve_credentials(host, labels, cfg)[0]


def resolve_credentials(host: str, labels: Mapping[str, str], cfg: Config) -> tuple[Credentials | None, str]:
    """:func:`registry_credentials` and where they came from: ``labels``, ``static``, ``kubelet``,
    ``docker`` (``""`` when none did: anonymous)."""
    auth = L.label_credentials(labels)
    if auth:
        return Credentials.from_auth(auth), "labels"
    static = cfg.remote.auths.get(host)
    if static is not None:
        if static.auth:
            try:
                return Credentials.from_auth(static.auth), "static"
            except StorageConfigError as exc:
                raise FailedPrecondition(f'remote.auths."{host}".auth: {exc}') from exc
        if static.username:
            return Credentials(static.username, static.password), "static"
    ra = cfg.remote.auth
    if ra.enable_kubelet_credential_providers:
        image = L.image_ref(labels) or host + "/"
        try:
            found = _providers(ra.credential_provider_config, ra.credential_provider_bin_dir).credentials(image)
        except CredentialError as exc:
            raise Unavailable(f"registry credentials for {host}: {exc}") from exc
        except StorageConfigError as exc:
            raise FailedPrecondition(f"remote.auth.credential_provider_config: {exc}") from exc
        if found:
            return found, "kubelet"
    try:
        found = docker_config_credentials(host, cfg.remote.docker_config or None)
    except CredentialError as exc:
        raise Unavailable(f"registry credentials for {host}: {exc}") from exc
    except StorageConfigError as exc:
        raise FailedPrecondition(f"registry credentials for {host}: {exc}") from exc
    return found, ("docker" if found else "")


def registry_auth(host: str, labels: Mapping[str, str], cfg: Config) -> str | None:
    """nydusd's ``auth`` value (base64) for ``host``, or None for anonymous."""
    creds = registry_credentials(host, labels, cfg)
    return creds.auth() if creds else None


#: what https to a plain-HTTP endpoint (or a closed port) looks like, per upstream's rule
_PLAIN_HTTP_SIGNS = ("wrong_version_number", "wrong version number", "record layer failure", "http request",
                     "http response to https", "connection refused", "errno 111")


def plain_http_fallback(ep: HostEndpoint, repo: str, timeout: float, ping: Ping | None = None) -> str:
    """``ep``'s scheme: http when it is insecure, has no explicit scheme, and https fails the way
    a plain-HTTP server (or refused connection) makes it fail; else its own scheme."""
    if ep.scheme != "https" or ep.explicit_scheme or not ep.skip_verify:
        return ep.scheme
    if ping is not None:
        err = ping("https", ep.host, timeout)
    else:
        client = RegistryClient(ep.host, repo, scheme="https", skip_verify=True, timeout=timeout,
                                connect_timeout=timeout)
        try:
            client.ping()
            err = None
        except StorageError as exc:
            err = str(exc)
        finally:
            client.close()
    if err is not None and any(sign in err.lower() for sign in _PLAIN_HTTP_SIGNS):
        log.warning("%s: https failed (%s); retrying with plain http (insecure endpoint)", ep.host,
                    err.splitlines()[0][:200])
        return "http"
    return "https"


def registry_config(image_ref: str, cfg: Config, ping: Ping | None = None) -> RegistryConfig:
    """Storage's registry settings for an image, without credentials."""
    ref = L.parse_image_ref(image_ref)
    host = ref.backend_host
    insecure = ref.host in cfg.remote.insecure_registries or host in cfg.remote.insecure_registries
    scheme, skip_verify = ("http" if insecure else "https"), cfg.remote.skip_ssl_verify
    # credentials go to mirrors too (auth_through): a mirror stands in for the image's registry
    mirrors = [MirrorConfig(host=m.rstrip("/"), auth_through=True)
               for m in cfg.remote.mirrors.get(ref.host, ()) or cfg.remote.mirrors.get(host, ())]
    try:
        hosts = load_hosts(cfg.remote.mirrors_config.dir, ref.host)
    except ConfigError as exc:
        raise FailedPrecondition(str(exc)) from exc
    if hosts is not None:
        timeout = float(cfg.remote.connect_timeout or 5)
        for ep in hosts.mirrors:
            mscheme = plain_http_fallback(ep, ref.repo, timeout, ping)
            mirrors.append(MirrorConfig(host=f"{mscheme}://{ep.host}", headers=ep.headers, ping_url=ep.ping_url,
                                        health_check_interval=ep.health_check_interval, auth_through=True))
            skip_verify = skip_verify or ep.skip_verify
        if hosts.server is not None and not insecure:
            scheme = plain_http_fallback(hosts.server, ref.repo, timeout, ping)
            skip_verify = skip_verify or hosts.server.skip_verify
    return RegistryConfig(host=host, repo=ref.repo, scheme=scheme,
                          skip_verify=skip_verify, timeout=float(cfg.remote.timeout),
                          connect_timeout=float(cfg.remote.connect_timeout), retry_limit=cfg.remote.retry_limit,
                          mirrors=tuple(mirrors), use_docker_config=False)


def check_reachable(image_ref: str, registry: RegistryConfig, ping: Ping | None = None) -> str:
    """The base URL of the first endpoint (mirrors in order, then the origin) whose ``/v2/``
    answers; :class:`Unavailable` naming every failure when none does."""
    errors: list[str] = []

    def probe(client: RegistryClient) -> None:
        try:
            if ping is None:
                client.ping()
                return
            err = ping(client.scheme, client.host, client.timeout[0])
            if err is not None:
                raise RegistryUnavailable(f"GET {client.base_url}/v2/: {err}")
        except StorageError as exc:
            errors.append(str(exc))
            raise

    backend = RegistryBackend(registry)
    try:
        return backend.ping(probe)
    except StorageError as exc:
        raise Unavailable(f"registry for image {image_ref} unreachable: " + "; ".join(errors or [str(exc)])
                          + " (check that the registry is up and the host/port are right; a plain-HTTP "
                            "registry needs [remote] insecure_registries or a hosts.toml server = \"http://...\")"
                          ) from exc
    finally:
        backend.close()


class ReachabilityProbe:
    """:func:`check_reachable` in a background thread, so that the registry's round trips
    overlap the instance mount instead of preceding it; :meth:`check` waits for it and raises
    its error (the same :class:`Unavailable`) when no endpoint answered."""

    def __init__(self, image_ref: str, registry: RegistryConfig, ping: Ping | None = None) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(image_ref, registry, ping),
                                        name="registry-probe", daemon=True)
        self._thread.start()

    def _run(self, image_ref: str, registry: RegistryConfig, ping: Ping | None) -> None:
        try:
            check_reachable(image_ref, registry, ping)
        except BaseException as exc:  # noqa: BLE001 - handed to check()
            self._error = exc

    def check(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def mirror_entry(m: MirrorConfig) -> dict[str, Any]:
    """nydusd's ``mirrors[]`` entry: host and auth_through, plus what a hosts.toml set."""
    entry: dict[str, Any] = {"host": m.host, "auth_through": m.auth_through}
    if m.headers:
        entry["headers"] = dict(m.headers)
    if m.ping_url:
        entry["ping_url"] = m.ping_url
    if m.health_check_interval != MirrorConfig.__dataclass_fields__["health_check_interval"].default:
        entry["health_check_interval"] = m.health_check_interval
    return entry


def backend_config(image_ref: str, labels: Mapping[str, str], cfg: Config,
                   ping: Ping | None = None) -> dict[str, Any]:
    """The nydusd ``device.backend`` for an image (registry host/repo, auth, mirrors), after
    the ``check_registry`` probe."""
    config, probe = backend_config_probing(image_ref, labels, cfg, ping)
    if probe is not None:
        probe.check()
    return config


def backend_config_probing(image_ref: str, labels: Mapping[str, str], cfg: Config,
                           ping: Ping | None = None) -> tuple[dict[str, Any], ReachabilityProbe | None]:
    """:func:`backend_config` with its ``check_registry`` probe still running (None when off):
    the caller mounts meanwhile and calls ``probe.check()`` before using the mount."""
    registry = registry_config(image_ref, cfg, ping)
    probe = ReachabilityProbe(image_ref, registry, ping) if cfg.remote.check_registry else None
    try:
        auth = registry_auth(L.parse_image_ref(image_ref).host, labels, cfg) or ""
    except BaseException:
        if probe is not None:
            probe.check()  # an unreachable registry is reported first, as when it was probed first
        raise
    config: dict[str, Any] = {
        "scheme": registry.scheme, "host": registry.host, "repo": registry.repo, "auth": auth,
        "skip_verify": registry.skip_verify, "timeout": cfg.remote.timeout,
        "connect_timeout": cfg.remote.connect_timeout, "retry_limit": cfg.remote.retry_limit}
    if registry.mirrors:
        config["mirrors"] = [mirror_entry(m) for m in registry.mirrors]
    if cfg.remote.docker_config:
        config["docker_config"] = cfg.remote.docker_config  # nydusd's own lookup reads the same file
    return {"type": "registry", "config": config}, probe
