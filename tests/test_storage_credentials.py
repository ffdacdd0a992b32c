"""docker config.json credentials and the credential-helper protocol (storage.backend.credentials).

The helpers are small scripts written by the tests (``docker-credential-test`` on PATH).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat

import pytest

from storage.backend.credentials import Credentials, DockerConfig, docker_config_credentials, helper_credentials
from storage.backend.registry import RegistryConfig
from storage.errors import ConfigError, CredentialError

HELPER = """#!/bin/sh
# a docker credential helper: answers from $HELPER_DB (JSON: server URL -> [user, secret])
[ "$1" = get ] || exit 2
read -r url
echo "$url" >> "$HELPER_LOG"
exec python3 -c '
import json, os, sys
db = json.load(open(os.environ["HELPER_DB"]))
url = sys.argv[1]
if os.environ.get("HELPER_FAIL"):
    print("keychain locked"); sys.exit(1)
if url not in db:
    print("credentials not found in native keychain"); sys.exit(1)
user, secret = db[url]
print(json.dumps({"ServerURL": url, "Username": user, "Secret": secret}))
' "$url"
"""


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """``docker-credential-test`` on PATH; returns ``(db dict writer, log path)``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "docker-credential-test"
    exe.write_text(HELPER)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    db = tmp_path / "helper-db.json"
    log = tmp_path / "helper.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HELPER_DB", str(db))
    monkeypatch.setenv("HELPER_LOG", str(log))

    def set_db(entries: dict[str, list[str]]) -> None:
        db.write_text(json.dumps(entries))

    set_db({})
    return set_db, log


def write_config(tmp_path, doc) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return str(path)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_auths_entries(tmp_path):
    path = write_config(tmp_path, {"auths": {
        "reg.example:5000": {"auth": b64("bob:pw:with:colons")},
        "https://index.docker.io/v1/": {"auth": b64("dh:x")},
        "tok.example": {"identitytoken": "refresh-me", "auth": b64("<token>:")},
        "https://plain.example/v2/": {"username": "u", "password": "p"},
        "empty.example": {},
    }})
    assert docker_config_credentials("reg.example:5000", path) == Credentials("bob", "pw:with:colons")
    assert docker_config_credentials("docker.io", path) == Credentials("dh", "x")
    assert docker_config_credentials("index.docker.io", path) == Credentials("dh", "x")
    assert docker_config_credentials("tok.example", path) == Credentials(identity_token="refresh-me")
    assert docker_config_credentials("plain.example", path) == Credentials("u", "p")
    assert docker_config_credentials("empty.example", path) is None
    assert docker_config_credentials("other", path) is None
    assert docker_config_credentials("x", str(tmp_path / "missing.json")) is None


def test_default_path_is_docker_config_env(tmp_path, monkeypatch):
    write_config(tmp_path, {"auths": {"h": {"auth": b64("a:b")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert docker_config_credentials("h") == Credentials("a", "b")


@pytest.mark.parametrize("doc, match", [
    ("{not json", "cannot read it as JSON"),
    ([1], "expected a JSON object"),
    ({"auths": {"h": "x"}}, "'auths'"),
    ({"credHelpers": {"h": 1}}, "'credHelpers'"),
    ({"credsStore": 3}, "'credsStore'"),
])
def test_bad_config_is_one_precise_error(tmp_path, doc, match):
    path = tmp_path / "config.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ConfigError, match=match):
        docker_config_credentials("h", str(path))


def test_cred_helpers_per_host_override_auths(tmp_path, helper):
    set_db, log = helper
    set_db({"reg.example:5000": ["alice", "s3cret"], "https://index.docker.io/v1/": ["hub", "hubpw"]})
    path = write_config(tmp_path, {
        "auths": {"reg.example:5000": {"auth": b64("stale:stale")}, "other.example": {"auth": b64("o:p")}},
        "credHelpers": {"reg.example:5000": "test", "docker.io": "test"},
    })
    assert docker_config_credentials("reg.example:5000", path) == Credentials("alice", "s3cret")
    assert docker_config_credentials("index.docker.io", path) == Credentials("hub", "hubpw")
    assert docker_config_credentials("other.example", path) == Credentials("o", "p")  # no helper for it
    # the server URL goes to the helper on stdin (docker hub as docker names it)
    assert log.read_text().split() == ["reg.example:5000", "https://index.docker.io/v1/"]


def test_creds_store_for_every_host_and_not_found_is_anonymous(tmp_path, helper):
    set_db, _ = helper
    set_db({"a.example": ["u", "p"]})
    path = write_config(tmp_path, {"credsStore": "test", "auths": {"b.example": {"auth": b64("x:y")}}})
    assert docker_config_credentials("a.example", path) == Credentials("u", "p")
    # docker's rule: with a helper, auths entries only mark the host; the helper has nothing
    assert docker_config_credentials("b.example", path) is None


def test_helper_identity_token(tmp_path, helper):
    set_db, _ = helper
    set_db({"t.example": ["<token>", "refresh-token"]})
    path = write_config(tmp_path, {"credHelpers": {"t.example": "test"}})
    creds = docker_config_credentials("t.example", path)
    assert creds == Credentials(identity_token="refresh-token")
    # nydusd's ``auth`` key carries it with the helper convention, and decodes back
    assert Credentials.from_auth(creds.auth()) == creds


def test_helper_failures_are_credential_errors_without_secrets(tmp_path, helper, monkeypatch):
    set_db, _ = helper
    set_db({"f.example": ["u", "very-secret"]})
    monkeypatch.setenv("HELPER_FAIL", "1")
    with pytest.raises(CredentialError, match="docker-credential-test for f.example failed.*keychain locked"):
        helper_credentials("test", "f.example")
    monkeypatch.delenv("HELPER_FAIL")
    path = write_config(tmp_path, {"credHelpers": {"f.example": "missing"}})
    with pytest.raises(CredentialError, match="docker-credential-missing .* not on PATH"):
        docker_config_credentials("f.example", path)


def test_secrets_never_in_repr_or_logs(tmp_path, helper, caplog):
    set_db, _ = helper
    set_db({"s.example": ["user", "very-secret"]})
    path = write_config(tmp_path, {"credHelpers": {"s.example": "test"}})
    with caplog.at_level(logging.DEBUG):
        creds = docker_config_credentials("s.example", path)
    assert creds.password == "very-secret"
    assert "very-secret" not in repr(creds) and "very-secret" not in caplog.text
    assert "very-secret" not in repr(Credentials(identity_token="very-secret"))


def test_registry_backend_uses_the_helper(tmp_path, helper):
    """nydusd's registry backend: empty ``auth`` → the docker config's helper."""
    set_db, _ = helper
    set_db({"127.0.0.1:5000": ["alice", "pw"]})
    path = write_config(tmp_path, {"credHelpers": {"127.0.0.1:5000": "test"}})
    cfg = RegistryConfig(host="127.0.0.1:5000", repo="r", scheme="http", docker_config=path)
    assert cfg.credentials() == Credentials("alice", "pw")
    assert RegistryConfig(host="127.0.0.1:5000", repo="r", auth=b64("x:y")).credentials() == Credentials("x", "y")


def test_docker_config_load_is_the_parsed_file(tmp_path):
    path = write_config(tmp_path, {"auths": {}, "credHelpers": {"h": "x"}, "credsStore": "y"})
    cfg = DockerConfig.load(path)
    assert cfg is not None and cfg.helper_for("h") == "x" and cfg.helper_for("other") == "y"
