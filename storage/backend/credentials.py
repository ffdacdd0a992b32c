"""Registry credentials: the one place that reads docker ``config.json`` and runs credential helpers.

Used by the registry backend (nydusd), the snapshotter and the image converter (nydusify).

Lookup for a registry host follows the docker CLI (``cli/config/configfile``):

1. ``credHelpers[<host>]`` names a helper for this host, else ``credsStore`` names one for every
   host: ``docker-credential-<name> get`` is run with the server URL on stdin and answers
   ``{"ServerURL", "Username", "Secret"}``; a ``Username`` of ``<token>`` means ``Secret`` is an
   identity (OAuth2 refresh) token. "credentials not found" from the helper means anonymous.
   When a helper is configured, ``auths`` entries only mark the host as known (docker's rule).
2. otherwise ``auths[<host>]``: ``auth`` (base64 ``user:password``), ``username``/``password``,
   ``identitytoken``. Keys match by host name whatever their scheme or path
   (``https://host/v1/``); ``docker.io`` / ``index.docker.io`` / ``registry-1.docker.io`` are one
   registry whose server URL is ``https://index.docker.io/v1/``.

Secrets never appear in ``repr``, logs or error messages.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from storage.errors import ConfigError, CredentialError

log = logging.getLogger(__name__)

#: the helper protocol's user name for an identity token
TOKEN_USERNAME = "<token>"
#: docker hub's names and its server URL as docker stores it
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
HELPER_PREFIX = "docker-credential-"
HELPER_TIMEOUT = 30.0
_NOT_FOUND = "credentials not found"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Registry credentials: user/password (Basic and token endpoint) or an identity token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @classmethod
    def from_auth(cls, auth: str) -> "Credentials":
        """Decode docker's ``auth`` field: base64 of ``user:password`` (user ``<token>``: an
        identity token, the credential-helper convention)."""
        try:
            user, _, password = base64.b64decode(auth, validate=False).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError("registry: 'auth' is not base64 of user:password") from exc
        if user == TOKEN_USERNAME:
            return cls(identity_token=password)
        return cls(user, password)

    def auth(self) -> str:
        """The inverse of :meth:`from_auth` (nydusd's ``auth`` key)."""
        if self.identity_token:
            return base64.b64encode(f"{TOKEN_USERNAME}:{self.identity_token}".encode()).decode()
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token)


def default_docker_config_path() -> str:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _hostname(key: str) -> str:
    """docker's ``ConvertToHostname``: ``https://h:5000/v1/`` → ``h:5000``."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc or key.split("://", 1)[1]
    return key.split("/", 1)[0]


def _is_hub(host: str) -> bool:
    return host in DOCKER_HUB_HOSTS


def server_url(host: str) -> str:
    """The server address docker hands to credential helpers for ``host``."""
    return DOCKER_HUB_SERVER if _is_hub(host) else host


def _same_registry(key: str, host: str) -> bool:
    name = _hostname(key)
    return name == host or (_is_hub(name) and _is_hub(host))


def helper_credentials(helper: str, url: str, *, timeout: float = HELPER_TIMEOUT) -> Credentials | None:
    """Run ``docker-credential-<helper> get`` for server ``url``; None when it has none."""
    exe = shutil.which(HELPER_PREFIX + helper)
    if exe is None:
        raise CredentialError(f"credential helper {HELPER_PREFIX}{helper} (for {url}) is not on PATH")
    try:
        proc = subprocess.run([exe, "get"], input=url.encode(), capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise CredentialError(f"credential helper {HELPER_PREFIX}{helper} for {url}: no answer in {timeout:g}s") from exc
    except OSError as exc:
        raise CredentialError(f"credential helper {HELPER_PREFIX}{helper} for {url}: {exc.strerror}") from exc
    if proc.returncode != 0:
        # on failure the protocol writes an error text, never a secret
        text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        if _NOT_FOUND in text.lower():
            return None
        raise CredentialError(f"credential helper {HELPER_PREFIX}{helper} for {url} failed "
                              f"(exit {proc.returncode}): {text.splitlines()[0][:200] if text else 'no message'}")
    try:
        doc = json.loads(proc.stdout)
        username, secret = doc.get("Username", ""), doc.get("Secret", "")
        if not isinstance(username, str) or not isinstance(secret, str):
            raise ValueError("Username and Secret must be strings")
    except (ValueError, AttributeError) as exc:
        raise CredentialError(f"credential helper {HELPER_PREFIX}{helper} for {url}: answer is not "
                              "a JSON object with Username and Secret") from exc
    if not secret:
        return None
    if username == TOKEN_USERNAME:
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


def _auths_entry(entry: Mapping[str, object], where: str) -> Credentials | None:
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    if auth is not None and not isinstance(auth, str):
        raise ConfigError(f"{where}.auth: expected a string")
    if token:
        if not isinstance(token, str):
            raise ConfigError(f"{where}.identitytoken: expected a string")
        user = Credentials.from_auth(auth).username if auth else str(entry.get("username") or "")
        return Credentials(username=user, identity_token=token)
    if auth:
        return Credentials.from_auth(auth)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password") or ""))
    return None


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """A parsed docker ``config.json`` (only what credentials need)."""

    path: str
    auths: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    cred_helpers: Mapping[str, str] = field(default_factory=dict)
    creds_store: str = ""

    @classmethod
    def load(cls, path: str | None = None) -> "DockerConfig | None":
        """The config at ``path`` (default :func:`default_docker_config_path`); None if absent.

        A file that is not a JSON object of the documented shape is a :class:`ConfigError`.
        """
        path = path or default_docker_config_path()
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"docker config {path}: {exc.__class__.__name__}: cannot read it as JSON") from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"docker config {path}: expected a JSON object")
        auths = doc.get("auths") or {}
        helpers = doc.get("credHelpers") or {}
        store = doc.get("credsStore") or ""
        if not isinstance(auths, dict) or not all(isinstance(v, dict) for v in auths.values()):
            raise ConfigError(f"docker config {path}: 'auths' must map hosts to objects")
        if not isinstance(helpers, dict) or not all(isinstance(v, str) for v in helpers.values()):
            raise ConfigError(f"docker config {path}: 'credHelpers' must map hosts to helper names")
        if not isinstance(store, str):
            raise ConfigError(f"docker config {path}: 'credsStore' must be a helper name")
        return cls(path, auths, helpers, store)

    def helper_for(self, host: str) -> str:
        """The credential helper docker would use for ``host`` ("" = none)."""
        for key, helper in self.cred_helpers.items():
            if _same_registry(key, host) and helper:
                return helper
        return self.creds_store

    def credentials(self, host: str) -> Credentials | None:
        """Credentials for registry ``host`` (``host[:port]``), or None for anonymous."""
        helper = self.helper_for(host)
        if helper:
            creds = helper_credentials(helper, server_url(host))
            log.debug("registry %s: credentials from %s%s: %s", host, HELPER_PREFIX, helper,
                      "found" if creds else "none")
            return creds
        # an exact key first, then any key naming the same registry
        keys = sorted(self.auths, key=lambda k: (k != host, k))
        for key in keys:
            if _same_registry(key, host):
                creds = _auths_entry(self.auths[key], f"docker config {self.path}: auths.{key}")
                if creds:
                    return creds
        return None


def docker_config_credentials(host: str, config_path: str | None = None) -> Credentials | None:
    """Credentials for ``host`` from docker's config (helpers and ``auths``); None = anonymous.

    ``config_path`` defaults to ``$DOCKER_CONFIG/config.json`` then ``~/.docker/config.json``.
    """
    config = DockerConfig.load(config_path)
    return config.credentials(host) if config is not None else None


# ------------------------------------------------------------------ kubelet credential providers

PROVIDER_REQUEST_KIND = "CredentialProviderRequest"
PROVIDER_RESPONSE_KIND = "CredentialProviderResponse"
PROVIDER_API_VERSIONS = ("credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v1beta1",
                         "credentialprovider.kubelet.k8s.io/v1alpha1")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, where: str) -> float:
    """A Go duration (``12h``, ``1h30m``, ``90s``, ``0``) in seconds."""
    import re

    if text in ("", "0"):
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"{where}: not a duration: {text!r} (like 12h, 30m, 90s)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _split_image(ref: str) -> tuple[str, str, str]:
    """``(host, port, path)`` of an image reference or a matchImages pattern."""
    ref = ref.split("://", 1)[-1]
    host, _, path = ref.partition("/")
    host, _, port = host.partition(":")
    path = path.split("@", 1)[0]
    if ":" in path.rsplit("/", 1)[-1]:
        path = path.rsplit(":", 1)[0]
    return host.lower(), port, path


def match_image(pattern: str, image: str) -> bool:
    """kubelet's ``matchImages`` rule: host labels globbed one by one (same count), the port equal
    when the pattern has one, the pattern's path a prefix of the image's path."""
    import fnmatch

    phost, pport, ppath = _split_image(pattern)
    ihost, iport, ipath = _split_image(image)
    plabels, ilabels = phost.split("."), ihost.split(".")
    if len(plabels) != len(ilabels) or not all(fnmatch.fnmatchcase(i, p) for p, i in zip(plabels, ilabels)):
        return False
    if pport and pport != iport:
        return False
    return not ppath or ipath == ppath or ipath.startswith(ppath.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class ExecProvider:
    name: str
    match_images: tuple[str, ...]
    default_cache_duration: float
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


class CredentialProviders:
    """kubelet's exec credential providers (a ``CredentialProviderConfig``, JSON or YAML): for an
    image matching a provider's ``matchImages`` the plugin ``<bin_dir>/<name>`` runs with a
    ``CredentialProviderRequest`` on stdin; the ``auth`` of its ``CredentialProviderResponse``
    gives the credentials, cached for ``cacheDuration`` (else the provider's
    ``defaultCacheDuration``) by ``cacheKeyType`` (``Image``, ``Registry`` or ``Global``)."""

    def __init__(self, providers: list[ExecProvider], bin_dir: str, *, timeout: float = HELPER_TIMEOUT,
                 clock: "object | None" = None) -> None:
        import time

        self.providers = providers
        self.bin_dir = bin_dir
        self.timeout = timeout
        self._clock = clock or time.monotonic
        self._cache: dict[tuple[str, str], tuple[float, dict]] = {}

    @classmethod
    def load(cls, config_path: str, bin_dir: str) -> "CredentialProviders":
        try:
            with open(config_path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"credential provider config {config_path}: {exc.strerror}") from None
        try:
            doc = json.loads(text)
        except ValueError:
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"credential provider config {config_path}: not JSON (YAML needs PyYAML)") from None
            try:
                doc = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"credential provider config {config_path}: not YAML: "
                                  f"{str(exc).splitlines()[0]}") from None
        where = f"credential provider config {config_path}"
        if not isinstance(doc, dict) or doc.get("kind") != "CredentialProviderConfig":
            raise ConfigError(f"{where}: kind must be CredentialProviderConfig")
        providers = []
        for i, p in enumerate(doc.get("providers") or []):
            at = f"{where}: providers[{i}]"
            if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"] \
                    or "/" in p["name"]:
                raise ConfigError(f"{at}.name: a plugin file name is required")
            images = p.get("matchImages")
            if not isinstance(images, list) or not images or not all(isinstance(m, str) for m in images):
                raise ConfigError(f"{at}.matchImages: a non-empty list of image patterns is required")
            api = p.get("apiVersion", PROVIDER_API_VERSIONS[0])
            if api not in PROVIDER_API_VERSIONS:
                raise ConfigError(f"{at}.apiVersion: unsupported {api!r}")
            env = p.get("env") or []
            if not isinstance(env, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                    for e in env):
                raise ConfigError(f"{at}.env: expected a list of {{name, value}}")
            args = p.get("args") or []
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise ConfigError(f"{at}.args: expected a list of strings")
            providers.append(ExecProvider(
                p["name"], tuple(images), parse_duration(str(p.get("defaultCacheDuration", "0")),
                                                         f"{at}.defaultCacheDuration"),
                api, tuple(args), tuple((e["name"], str(e.get("value", ""))) for e in env)))
        return cls(providers, bin_dir)

    def credentials(self, image: str) -> Credentials | None:
        """Credentials for pulling ``image`` (a reference with its host); None = no provider has any."""
        host, port, path = _split_image(image)
        for prov in self.providers:
            if not any(match_image(m, image) for m in prov.match_images):
                continue
            now = self._clock()
            auth = None
            for key in ((prov.name, image), (prov.name, host + (":" + port if port else "")), (prov.name, "")):
                hit = self._cache.get(key)
                if hit and hit[0] > now:
                    auth = hit[1]
                    break
            if auth is None:
                auth = self._run(prov, image, now)
            for pattern in sorted(auth, key=len, reverse=True):
                if match_image(pattern, image):
                    entry = auth[pattern]
                    if isinstance(entry, dict) and entry.get("password"):
                        return Credentials(str(entry.get("username", "")), str(entry["password"]))
        return None

    def _run(self, prov: ExecProvider, image: str, now: float) -> dict:
        exe = os.path.join(self.bin_dir, prov.name)
        what = f"credential provider {prov.name} for {image}"
        request = json.dumps({"apiVersion": prov.api_version, "kind": PROVIDER_REQUEST_KIND, "image": image})
        env = dict(os.environ)
        env.update(dict(prov.env))
        try:
            proc = subprocess.run([exe, *prov.args], input=request.encode(), capture_output=True,
                                  timeout=self.timeout, check=False, env=env)
        except subprocess.TimeoutExpired:
            raise CredentialError(f"{what}: no answer in {self.timeout:g}s") from None
        except OSError as exc:
            raise CredentialError(f"{what}: cannot run {exe}: {exc.strerror}") from None
        if proc.returncode != 0:
            text = proc.stderr.decode(errors="replace").strip()
            raise CredentialError(f"{what} failed (exit {proc.returncode}): "
                                  f"{text.splitlines()[0][:200] if text else 'no message'}")
        try:
            doc = json.loads(proc.stdout)
            if doc.get("kind") != PROVIDER_RESPONSE_KIND:
                raise ValueError
            auth = doc.get("auth") or {}
            if not isinstance(auth, dict):
                raise ValueError
            ttl = (parse_duration(doc["cacheDuration"], "cacheDuration") if doc.get("cacheDuration")
                   else prov.default_cache_duration)
            key_type = doc.get("cacheKeyType", "Image")
        except (ValueError, AttributeError, TypeError, ConfigError):
            raise CredentialError(f"{what}: answer is not a CredentialProviderResponse") from None
        if ttl > 0:
            host, port, _ = _split_image(image)
            key = {"Image": image, "Registry": host + (":" + port if port else ""), "Global": ""}.get(key_type, image)
            self._cache[(prov.name, key)] = (now + ttl, auth)
        return auth


__all__ = [
    "CredentialProviders", "match_image", "parse_duration",
    "Credentials", "DockerConfig", "TOKEN_USERNAME", "default_docker_config_path", "docker_config_credentials",
    "helper_credentials", "server_url",
]
