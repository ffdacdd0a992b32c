"""Storage against a REAL docker-registry: auth modes, mirrors, proxy, faults, concurrency."""

from __future__ import annotations

import base64
import json
import threading

import pytest

from integration.storage_registry import REGISTRY_BIN, FaultProxy, LocalRegistry, TokenIssuer, free_port
from storage.backend.config import backend_from_config
from storage.backend.credentials import Credentials
from storage.backend.registry import RegistryClient
from storage.cache.base import CacheConfig
from storage.cache.filecache import FileCacheManager
from storage.device import BlobDevice
from storage.errors import AuthError, BlobNotFound, ChunkDigestMismatch, RegistryError, RegistryUnavailable
from tests.storage_blobs import make_blob

pytestmark = pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry (Debian package) not installed")

REPO = "storage/test"
USERS = {"alice": "s3cret"}


def _auth(user="alice", pw="s3cret") -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


@pytest.fixture(scope="module")
def blob():
    return make_blob(48, chunk_size=16384, seed=7)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, blob):
    reg = LocalRegistry(str(tmp_path_factory.mktemp("reg-anon")))
    try:
        reg.push_blob(REPO, blob.data)
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory, blob):
    reg = LocalRegistry(str(tmp_path_factory.mktemp("reg-basic")), auth="htpasswd", users=USERS)
    try:
        reg.push_blob(REPO, blob.data)
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory, blob):
    d = str(tmp_path_factory.mktemp("reg-token"))
    issuer = TokenIssuer(d, users=USERS)
    try:
        reg = LocalRegistry(d, auth="token", token_issuer=issuer)
        try:
            reg.push_blob(REPO, blob.data)
            yield reg
        finally:
            reg.stop()
    finally:
        issuer.close()


@pytest.fixture
def fault_proxy(registry):
    p = FaultProxy(registry.host)
    yield p
    p.close()


def _backend(host: str, **extra):
    cfg = {"scheme": "http", "host": host, "repo": REPO, "timeout": 5, "connect_timeout": 2,
           "retry_limit": 2, "docker_config": "/nonexistent/config.json", **extra}
    return backend_from_config({"type": "registry", "config": cfg})


def _device(tmp_path, backend, blob, **cfg):
    mgr = FileCacheManager(str(tmp_path / "cache"), backend, CacheConfig(**cfg))
    return mgr, BlobDevice([blob.info], mgr)


def _read_all(dev, blob) -> None:
    assert dev.read(blob.iovec(0, len(blob.plain))) == blob.plain


def test_anonymous_read(tmp_path, registry, blob):
    backend = _backend(registry.host)
    assert backend.reader(blob.blob_id).blob_size() == len(blob.data)
    _, dev = _device(tmp_path, backend, blob)
    _read_all(dev, blob)
    assert dev.blob_data_path(0)
    with pytest.raises(BlobNotFound):
        backend.reader("0" * 64).read(0, 10)
    dev.close()
    backend.close()


def test_basic_auth(tmp_path, basic_registry, blob):
    backend = _backend(basic_registry.host, auth=_auth())
    _, dev = _device(tmp_path, backend, blob)
    _read_all(dev, blob)
    with pytest.raises(AuthError):
        _backend(basic_registry.host, auth=_auth(pw="wrong")).reader(blob.blob_id).read(0, 10)
    with pytest.raises(AuthError):
        _backend(basic_registry.host).reader(blob.blob_id).read(0, 10)


def test_basic_auth_from_docker_config(tmp_path, basic_registry, blob):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {basic_registry.host: {"auth": _auth()}}}))
    backend = _backend(basic_registry.host, docker_config=str(cfg))
    assert backend.reader(blob.blob_id).read(0, 100) == blob.data[:100]


def test_bearer_token_reused_and_refreshed(tmp_path, token_registry, blob):
    issuer = token_registry.token_issuer
    before = len(issuer.requests)
    backend = _backend(token_registry.host, auth=_auth())
    _, dev = _device(tmp_path, backend, blob, merging_size=65536)
    _read_all(dev, blob)
    assert len(issuer.requests) - before == 1, "token must be reused across requests"
    assert issuer.requests[-1]["auth"].startswith("Basic ")
    assert f"repository:{REPO}:pull" in issuer.requests[-1]["scope"]
    # a revoked/expired token: the 401 makes the client fetch a new one
    client = backend.client
    for scope in list(client._tokens):
        client._tokens[scope] = ("bogus", client._tokens[scope][1])
    assert backend.reader(blob.blob_id).read(10, 20) == blob.data[10:30]
    assert len(issuer.requests) - before == 2
    # a token about to expire is refreshed before use (no 401 round trip needed)
    import time

    for scope in list(client._tokens):
        client._tokens[scope] = (client._tokens[scope][0], time.monotonic() + 1)
    assert backend.reader(blob.blob_id).read(30, 5) == blob.data[30:35]
    assert len(issuer.requests) - before == 3
    with pytest.raises(AuthError):
        _backend(token_registry.host, auth=_auth(pw="nope")).reader(blob.blob_id).read(0, 1)
    with pytest.raises(AuthError):  # anonymous: the issuer refuses, so does the registry
        _backend(token_registry.host).reader(blob.blob_id).read(0, 1)


def test_registry_client_push_with_token(token_registry):
    """The converter reuses RegistryClient for pushes: POST + PUT with auth handled."""
    client = RegistryClient(token_registry.host, "storage/pushed", scheme="http",
                            credentials=Credentials("alice", "s3cret"))
    data = b"pushed by RegistryClient" * 100
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = client.request("POST", "/v2/storage/pushed/blobs/uploads/")
    assert r.status_code == 202, r.text
    loc = r.headers["Location"]
    r = client.request("PUT", loc, params={"digest": digest}, data=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert client.read_blob_range(digest, 0, 24) == data[:24]
    client.close()


def test_mirror_down_falls_back_to_origin(tmp_path, registry, blob, fault_proxy):
    dead = f"http://127.0.0.1:{free_port()}"
    backend = _backend(registry.host, mirrors=[{"host": dead}, {"host": fault_proxy.url,
                                                                "headers": {"X-Mirror": "1"}}])
    assert backend.reader(blob.blob_id).read(0, 100) == blob.data[:100]
    assert len(fault_proxy.blob_gets()) == 1  # the healthy mirror served it
    fault_proxy.close()  # now every mirror is down: origin serves
    _, dev = _device(tmp_path, backend, blob)
    _read_all(dev, blob)


def test_proxy_failure_falls_back_to_registry(tmp_path, registry, blob):
    p = FaultProxy()  # a forward proxy (absolute-form requests)
    try:
        backend = _backend(registry.host, proxy={"url": p.url, "fallback": True, "check_interval": 60})
        assert backend.reader(blob.blob_id).read(0, 64) == blob.data[:64]
        assert p.blob_gets(), "reads must go through the proxy while it is healthy"
        p.faults.extend(["500"] * 10)  # the P2P agent breaks
        _, dev = _device(tmp_path, backend, blob)
        _read_all(dev, blob)
        assert len(p.faults) == 9, "after one failure the proxy is skipped"
    finally:
        p.close()
    dead = _backend(registry.host, proxy={"url": f"http://127.0.0.1:{free_port()}", "fallback": True})
    assert dead.reader(blob.blob_id).read(5, 5) == blob.data[5:10]
    nofallback = _backend(registry.host, retry_limit=0,
                          proxy={"url": f"http://127.0.0.1:{free_port()}", "fallback": False})
    with pytest.raises(RegistryUnavailable):
        nofallback.reader(blob.blob_id).read(5, 5)


@pytest.mark.parametrize("fault", ["reset", "500", "truncate", "slow:2"])
def test_transient_faults_are_retried(tmp_path, blob, fault_proxy, fault):
    backend = _backend(fault_proxy.host, timeout=1)
    mgr, dev = _device(tmp_path, backend, blob)
    fault_proxy.faults.append(fault)
    _read_all(dev, blob)
    assert mgr.metrics.backend_retries.value >= 1
    assert not fault_proxy.faults


def test_persistent_failure_is_a_precise_error_and_nothing_ready(tmp_path, blob, fault_proxy):
    backend = _backend(fault_proxy.host, retry_limit=2)
    mgr, dev = _device(tmp_path, backend, blob)
    fault_proxy.faults.extend(["reset", "truncate", "500"])
    with pytest.raises(RegistryUnavailable):
        dev.read(blob.iovec(0, 4 * 16384))
    cache = mgr.get_blob_cache(blob.info)
    assert cache.chunk_map.ready_count() == 0
    _read_all(dev, blob)  # the registry is fine again


def test_wrong_bytes_never_returned_or_cached(tmp_path, blob, fault_proxy):
    backend = _backend(fault_proxy.host)
    mgr, dev = _device(tmp_path, backend, blob, merging_size=16384)
    fault_proxy.faults.extend(["corrupt", "corrupt"])  # the read and its one re-read
    with pytest.raises(ChunkDigestMismatch) as ei:
        dev.read(blob.iovec(0, 16384))
    assert ei.value.blob_id == blob.blob_id and ei.value.chunk_index == 0
    assert not mgr.get_blob_cache(blob.info).chunk_map.is_ready(0)
    _read_all(dev, blob)


def test_32_concurrent_readers_fetch_each_chunk_once(tmp_path, registry, blob, fault_proxy):
    mark = registry.registry.log_mark()
    backend = _backend(fault_proxy.host)
    _, dev = _device(tmp_path, backend, blob, merging_size=4 * 16384)
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def reader(k: int) -> None:
        try:
            barrier.wait()
            off = (k * 5 % 40) * 16384 + 99
            assert dev.read(blob.iovec(off, 6 * 16384)) == blob.plain[off : off + 6 * 16384]
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    counts: dict[int, int] = {}
    for req in fault_proxy.blob_gets():
        lo, hi = req.range_bounds
        for c in blob.chunks:
            if lo <= c.compressed_offset <= hi:
                counts[c.index] = counts.get(c.index, 0) + 1
    assert counts and max(counts.values()) == 1, counts
    # the registry's own access log agrees: no byte was served twice
    ranged = sum(hi - lo + 1 for lo, hi in (r.range_bounds for r in fault_proxy.blob_gets()))
    assert registry.registry.bytes_fetched(since=mark) == ranged <= len(blob.data)
    _read_all(dev, blob)


def test_identity_token_from_docker_config(tmp_path, token_registry, blob):
    issuer = token_registry.token_issuer
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {token_registry.host: {
        "auth": base64.b64encode(b"<token>:").decode(), "identitytoken": issuer.refresh_token}}}))
    backend = _backend(token_registry.host, docker_config=str(cfg))
    assert backend.reader(blob.blob_id).read(0, 100) == blob.data[:100]
    assert issuer.requests[-1]["auth"] == "refresh_token:" + issuer.refresh_token


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, blob):
    reg = LocalRegistry(str(tmp_path_factory.mktemp("reg-tls")), tls=True)
    try:
        reg.push_blob(REPO, blob.data)
        yield reg
    finally:
        reg.stop()


def test_https_with_custom_ca_and_skip_verify(tls_registry, blob):
    def backend(**extra):
        cfg = {"scheme": "https", "host": tls_registry.host, "repo": REPO, "retry_limit": 0,
               "docker_config": "/nonexistent/config.json", **extra}
        return backend_from_config({"type": "registry", "config": cfg})

    assert backend(ca_cert_files=[tls_registry.ca_path]).reader(blob.blob_id).read(0, 50) == blob.data[:50]
    assert backend(skip_verify=True).reader(blob.blob_id).read(50, 50) == blob.data[50:100]
    with pytest.raises(RegistryError, match="TLS"):
        backend().reader(blob.blob_id).read(0, 50)


def test_nocache_and_prefetch_over_registry(tmp_path, registry, blob):
    from storage.cache.nocache import NoCacheManager
    from storage.prefetch import PrefetchConfig

    dev = BlobDevice([blob.info], NoCacheManager(None, _backend(registry.host)))
    _read_all(dev, blob)
    dev.close()
    backend = _backend(registry.host)
    mgr = FileCacheManager(str(tmp_path / "cache"), backend)
    dev = BlobDevice([blob.info], mgr, prefetch_config=PrefetchConfig(bandwidth_rate=10 << 20))
    assert dev.prefetch_blob(0, blob.chunks)
    assert dev.prefetcher.wait(30)
    assert dev.blob_data_path(0)
    assert mgr.metrics.prefetch_bytes.value == len(blob.data)
    before = mgr.metrics.backend_read_count.value
    _read_all(dev, blob)
    assert mgr.metrics.backend_read_count.value == before
    assert "nydus_storage_prefetch_bytes_total" in mgr.metrics.render()
    dev.close()


def test_mirror_health_check_recovers(registry, blob, fault_proxy):
    import time

    backend = _backend(registry.host, mirrors=[{"host": fault_proxy.url, "ping_url": fault_proxy.url + "/v2/",
                                                "health_check_interval": 0.3}])
    reader = backend.reader(blob.blob_id)
    fault_proxy.faults.append("500")
    assert reader.read(0, 10) == blob.data[:10]  # mirror failed -> origin
    n = len(fault_proxy.blob_gets())
    assert reader.read(10, 10) == blob.data[10:20]  # mirror skipped while unhealthy
    assert len(fault_proxy.blob_gets()) == n
    time.sleep(0.35)
    assert reader.read(20, 10) == blob.data[20:30]  # pinged healthy -> used again
    assert len(fault_proxy.blob_gets()) == n + 1
    assert any(r.target == "/v2/" for r in fault_proxy.log)
