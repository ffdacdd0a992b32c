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


__all__ = [
    "Credentials", "DockerConfig", "TOKEN_USERNAME", "default_docker_config_path", "docker_config_credentials",
    "helper_credentials", "server_url",
]
