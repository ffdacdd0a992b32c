"""A real ``docker-registry`` (distribution 2.x) on 127.0.0.1 with a free port.

    with Registry() as reg:                         # plain HTTP, no auth
        d = reg.push_blob("lib/x", b"data")         # -> "sha256:..."
        reg.put_manifest("lib/x", "v1", manifest)   # dict or bytes
        reg.blob_fetches(d)                         # access-log entries of GETs of that blob

    with Registry(users={"alice": "secret"}) as reg:   # htpasswd Basic auth (bcrypt)
        reg.auth                                       # ("alice", "secret"), used by push helpers

    with Registry(extra_config={"auth": {"token": {...}}}) as reg: ...   # any config, deep-merged

The configuration file is JSON (a subset of YAML, which the registry reads). Storage lives in a
private temp dir that is removed on exit; the process is stopped by PID. The access log (one
Apache "combined" line per request, written by the registry to its output) stays readable after
exit through :meth:`access_log`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Callable, Mapping

import requests

from integration.harness import HarnessError
from integration.harness.util import (free_port, log_tail, with_pdeathsig, stop_process,
                                      wait_until)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT_ALL = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

REGISTRY_BIN = "docker-registry"

# 127.0.0.1 - - [23/Nov/2026:14:57:28 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "myagent"
_ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"')
_BLOB_PATH_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")


@dataclasses.dataclass(frozen=True, slots=True)
class AccessLogEntry:
    """One request the registry served (from its access log)."""

    method: str
    path: str            # request URI without the query string
    query: str
    status: int
    size: int            # response bytes written
    agent: str

    @property
    def blob_digest(self) -> str | None:
        """The digest if this was a ``/v2/<repo>/blobs/<digest>`` request."""
        m = _BLOB_PATH_RE.match(self.path)
        return m.group("digest") if m else None

    @property
    def repo(self) -> str | None:
        m = re.match(r"^/v2/(.+)/(blobs|manifests|tags)/", self.path)
        return m.group(1) if m else None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd line with a bcrypt hash (the only scheme docker-registry accepts)."""
    import bcrypt  # test extra

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}"


def _deep_merge(base: dict, extra: Mapping) -> dict:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


class Registry:
    """A private docker-registry process; use as a context manager (or start()/stop())."""

    def __init__(self, *, users: Mapping[str, str] | None = None,
                 extra_config: Mapping[str, Any] | None = None,
                 config_hook: Callable[["Registry", dict], None] | None = None,
                 realm: str = "pynydus-test", base_dir: str | None = None,
                 start_timeout: float = 20.0) -> None:
        """``users``: htpasswd Basic-auth users (name -> password); ``extra_config``: deep-merged
        into the generated config; ``config_hook(reg, cfg)``: edit the config dict last (it
        may use ``reg.dir`` / ``reg.host``, already set when it runs)."""
        self.users = dict(users or {})
        self.extra_config = dict(extra_config or {})
        self.config_hook = config_hook
        self.realm = realm
        self._base_dir = base_dir
        self.start_timeout = start_timeout
        self.dir: str = ""
        self.port: int = 0
        self.proc: subprocess.Popen | None = None
        self.config: dict = {}
        self._log_text: str | None = None
        self.session = requests.Session()

    # -- addresses ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (what goes into an image reference)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """Basic credentials of the first configured user, or None."""
        if not self.users:
            return None
        user = next(iter(self.users))
        return (user, self.users[user])

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "registry.log")

    @property
    def storage_dir(self) -> str:
        return os.path.join(self.dir, "data")

    def ref(self, repo: str, tag: str = "latest") -> str:
        """An image reference on this registry (``127.0.0.1:PORT/repo:tag`` or ``@digest``)."""
        sep = "@" if tag.startswith("sha256:") else ":"
        return f"{self.host}/{repo}{sep}{tag}"

    # -- lifecycle ---------------------------------------------------------------------------
    def _build_config(self) -> dict:
        cfg: dict = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": self.storage_dir},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "pynydus-harness-secret"},
        }
        if self.users:
            htpasswd = os.path.join(self.dir, "htpasswd")
            with open(htpasswd, "w") as f:
                for user, password in self.users.items():
                    f.write(htpasswd_line(user, password) + "\n")
            cfg["auth"] = {"htpasswd": {"realm": self.realm, "path": htpasswd}}
        _deep_merge(cfg, self.extra_config)
        if self.config_hook is not None:
            self.config_hook(self, cfg)
        return cfg

    def start(self) -> "Registry":
        if shutil.which(REGISTRY_BIN) is None:
            raise HarnessError(f"{REGISTRY_BIN} not found (Debian package docker-registry)")
        self.dir = tempfile.mkdtemp(prefix="pynydus-registry-", dir=self._base_dir)
        os.makedirs(self.storage_dir)
        try:
            for attempt in range(5):
                self.port = free_port()
                self.config = self._build_config()
                cfg_path = os.path.join(self.dir, "config.yml")
                with open(cfg_path, "w") as f:
                    json.dump(self.config, f, indent=1)
                log = open(self.log_path, "ab")
                try:
                    self.proc = subprocess.Popen(with_pdeathsig([REGISTRY_BIN, "serve", cfg_path]), stdout=log,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 start_new_session=True)
                finally:
                    log.close()
                try:
                    wait_until(self._ping, self.start_timeout, "docker-registry", self.proc,
                               self.log_path)
                    return self
                except HarnessError:
                    stop_process(self.proc)
                    if "address already in use" in log_tail(self.log_path) and attempt < 4:
                        continue   # lost the port race with another process; try another port
                    raise
            raise HarnessError("docker-registry: no free port found")
        except BaseException:
            self.stop()
            raise

    def _ping(self) -> bool:
        r = requests.get(f"{self.url}/v2/", timeout=2)
        return r.status_code in (200, 401)

    def stop(self) -> None:
        """Stop the process (by PID), keep the log text, remove the temp dir."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.dir and os.path.isdir(self.dir):
            try:
                with open(self.log_path, "rb") as f:
                    self._log_text = f.read().decode(errors="replace")
            except FileNotFoundError:
                self._log_text = ""
            shutil.rmtree(self.dir, ignore_errors=True)
        self.session.close()

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- access log --------------------------------------------------------------------------
    def log_text(self) -> str:
        if self._log_text is not None and (self.proc is None):
            return self._log_text
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return self._log_text or ""

    def access_log(self) -> list[AccessLogEntry]:
        """Every request served so far, in order."""
        out = []
        for line in self.log_text().splitlines():
            m = _ACCESS_RE.match(line)
            if not m:
                continue
            path, _, query = m.group("path").partition("?")
            size = m.group("size")
            out.append(AccessLogEntry(method=m.group("method"), path=path, query=query,
                                      status=int(m.group("status")),
                                      size=0 if size == "-" else int(size),
                                      agent=m.group("agent")))
        return out

    def log_mark(self) -> int:
        """Number of access-log entries so far; pass to ``blob_fetches(since=...)``."""
        return len(self.access_log())

    def blob_fetches(self, digest: str | None = None, *, since: int = 0,
                     repo: str | None = None) -> list[AccessLogEntry]:
        """Successful GETs of blobs (optionally one digest / repo) after entry ``since``."""
        res = []
        for e in self.access_log()[since:]:
            if e.method != "GET" or e.status not in (200, 206) or e.blob_digest is None:
                continue
            if digest is not None and e.blob_digest != digest:
                continue
            if repo is not None and e.repo != repo:
                continue
            res.append(e)
        return res

    def bytes_fetched(self, *, since: int = 0, repo: str | None = None) -> int:
        """Blob bytes served (sum of response sizes of successful blob GETs)."""
        return sum(e.size for e in self.blob_fetches(since=since, repo=repo))

    # -- plain-HTTP client helpers ------------------------------------------------------------
    def _req(self, method: str, url: str, auth: Any = None, **kw: Any) -> requests.Response:
        if not url.startswith("http"):
            url = self.url + url
        return self.session.request(method, url, auth=auth if auth is not None else self.auth,
                                    timeout=60, **kw)

    def has_blob(self, repo: str, digest: str, *, auth: Any = None) -> bool:
        r = self._req("HEAD", f"/v2/{repo}/blobs/{digest}", auth)
        return r.status_code == 200

    def push_blob(self, repo: str, data: bytes, *, auth: Any = None) -> str:
        """Upload one blob (POST + monolithic PUT); returns its ``sha256:`` digest."""
        digest = sha256_digest(data)
        if self.has_blob(repo, digest, auth=auth):
            return digest
        r = self._req("POST", f"/v2/{repo}/blobs/uploads/", auth)
        if r.status_code != 202:
            raise HarnessError(f"start upload to {repo}: HTTP {r.status_code} {r.text[:300]}")
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.url + loc
        sep = "&" if "?" in loc else "?"
        r = self._req("PUT", f"{loc}{sep}digest={digest}", auth, data=data,
                      headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 201:
            raise HarnessError(f"finish upload of {digest} to {repo}: HTTP {r.status_code} "
                               f"{r.text[:300]}")
        return digest

    def put_manifest(self, repo: str, reference: str, manifest: bytes | Mapping[str, Any],
                     media_type: str | None = None, *, auth: Any = None) -> str:
        """PUT a manifest (or index) under a tag or digest; returns the manifest digest.

        A dict is serialized as compact JSON; ``media_type`` defaults to its ``mediaType`` or OCI.
        """
        if isinstance(manifest, (bytes, bytearray)):
            body = bytes(manifest)
            if media_type is None:
                media_type = json.loads(body).get("mediaType", OCI_MANIFEST)
        else:
            body = json.dumps(manifest, separators=(",", ":")).encode()
            if media_type is None:
                media_type = str(manifest.get("mediaType", OCI_MANIFEST))
        r = self._req("PUT", f"/v2/{repo}/manifests/{reference}", auth, data=body,
                      headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise HarnessError(f"put manifest {repo}:{reference}: HTTP {r.status_code} "
                               f"{r.text[:300]}")
        return sha256_digest(body)

    def get_manifest(self, repo: str, reference: str, *, auth: Any = None) -> tuple[bytes, str]:
        """(body, media type) of a manifest by tag or digest."""
        r = self._req("GET", f"/v2/{repo}/manifests/{reference}", auth,
                      headers={"Accept": ACCEPT_ALL})
        if r.status_code != 200:
            raise HarnessError(f"get manifest {repo}:{reference}: HTTP {r.status_code}")
        return r.content, r.headers.get("Content-Type", "")

    def get_blob(self, repo: str, digest: str, *, auth: Any = None) -> bytes:
        r = self._req("GET", f"/v2/{repo}/blobs/{digest}", auth)
        if r.status_code != 200:
            raise HarnessError(f"get blob {repo}@{digest}: HTTP {r.status_code}")
        return r.content
