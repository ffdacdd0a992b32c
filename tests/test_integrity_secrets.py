"""Pull credentials given as labels are never stored as labels, returned by Stat/List, logged, or
written to a file other than the 0600 ones that need them."""

from __future__ import annotations

import base64
import logging
import os
import stat

import pytest

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter import labels as L
from snapshotter.config import RemoteConfig
from tests.snapshotter_helpers import FakeManager, Harness
from tests.test_snapshotter_nydus import bootstrap, pull_image  # noqa: F401 - fixture

SECRET = "s3cr3t-Pa55w0rd-xyzzy"
USER = "puller-7"
CREDS = {L.PULL_USERNAME: USER, L.PULL_SECRET: SECRET}
ENCODED = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()


def _files_under(root: str):
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield os.path.join(dirpath, name)


def _all_labels(h: Harness) -> list[dict]:
    out = []
    for resp in h.stub.List(pb.ListSnapshotsRequest(snapshotter="nydus")):
        for info in resp.info:
            out.append(dict(info.labels))
            out.append(dict(h.stat(info.name).labels))
    return out


def test_credential_labels_are_kept_out_of_metastore_replies_and_logs(tmp_path, bootstrap, caplog):  # noqa: F811
    remote = RemoteConfig(check_registry=False, insecure_registries=("127.0.0.1:5000",))
    h = Harness(tmp_path, manager=FakeManager(), remote=remote)
    try:
        with caplog.at_level(logging.DEBUG):
            meta = pull_image(h, bootstrap, meta_extra=CREDS)
            h.prepare("ctr", meta)  # a container's rootfs Prepare carries no credentials
            h.commit("committed-ctr", "ctr", {**CREDS, "keep": "me"})
            replies = _all_labels(h)
            assert replies and all(L.PULL_SECRET not in lb and L.PULL_USERNAME not in lb for lb in replies)
            assert {"keep": "me"}.items() <= dict(h.stat("committed-ctr").labels).items()
            # ... yet the image is mounted with the pull's credentials
            assert h.manager.ops("mount")[-1][4]["config"]["auth"] == ENCODED
        h.restart()  # after a restart too
        h.remove("committed-ctr")
        h.prepare("ctr2", meta)
        assert h.manager.ops("mount")[-1][4]["config"]["auth"] == ENCODED
    finally:
        h.stop()
    for text in (caplog.text,):
        assert SECRET not in text and ENCODED not in text
    holders = []
    for path in _files_under(h.root):
        data = open(path, "rb").read()
        if SECRET.encode() in data or ENCODED.encode() in data:
            holders.append(os.path.relpath(path, h.root))
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert holders == ["credentials.json"]  # not metadata.db (or its WAL), not any record


def test_daemon_config_files_are_written_0600(tmp_path):
    from rafs.daemon.manager import _write_json

    path = str(tmp_path / "config" / "d" / "config.json")
    tmp = f"{path}.tmp.{os.getpid()}.0"
    os.makedirs(os.path.dirname(path))
    with open(tmp, "w") as f:  # a leftover temp file with a wide mode
        f.write("x")
    os.chmod(tmp, 0o644)
    _write_json(path, {"device": {"backend": {"config": {"auth": ENCODED}}}})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_old_metastore_rows_with_credentials_are_not_returned(tmp_path):
    from snapshotter.metastore import MetaStore
    import snapshotter.metastore as store
    import json
    import sqlite3

    ms = MetaStore(str(tmp_path / "metadata.db"))
    with ms.transaction(writable=True) as tx:
        store.create_snapshot(tx, store.Kind.ACTIVE, "k", "", {"a": "b"})
    ms.close()
    db = sqlite3.connect(str(tmp_path / "metadata.db"))
    db.execute("UPDATE snapshots SET labels=?", (json.dumps({"a": "b", L.PULL_SECRET: SECRET}),))
    db.commit()
    db.close()
    ms = MetaStore(str(tmp_path / "metadata.db"))
    with ms.transaction(writable=False) as tx:
        assert store.get_info(tx, "k")[1].labels == {"a": "b"}
    ms.close()


@pytest.mark.parametrize("labels", [{L.PULL_SECRET: SECRET}, CREDS])
def test_credentials_without_image_ref_are_not_kept(tmp_path, labels):
    from snapshotter.pull_credentials import CredentialStore

    cs = CredentialStore(str(tmp_path))
    cs.remember(labels)
    assert not os.path.exists(cs.path)
    cs.remember({**labels, L.CRI_IMAGE_REF: "127.0.0.1:5000/a/b:1"})
    assert cs.labels_for("127.0.0.1:5000/a/b:2")[L.PULL_SECRET] == SECRET
    assert cs.labels_for("127.0.0.1:5000/a/c:1") == {}
    assert stat.S_IMODE(os.stat(cs.path).st_mode) == 0o600
