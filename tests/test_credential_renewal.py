"""Credential renewal (``[remote.auth] credential_renewal_interval``) over a fake instance manager:
which instances are renewed, what is counted, what is left alone. The end-to-end proof (a
password rotated under a running container) is in integration/test_snapshotter_credentials.py."""

from __future__ import annotations

import base64
import json
import threading
import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from snapshotter import config as C
from snapshotter import labels as L
from snapshotter.renewal import CredentialRenewal

HOST = "127.0.0.1:5999"
REF = f"{HOST}/team/app:1"


class FakeManager:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.auths: dict[str, str] = {}
        self.fail: set[str] = set()

    def update_auth(self, iid: str, auth: str) -> bool:
        self.calls.append((iid, auth))
        if iid in self.fail:
            raise OSError("daemon socket gone")
        changed = self.auths.get(iid) != auth
        self.auths[iid] = auth
        return changed


def _sn(tmp_path, refs: dict[str, str], *, label_creds: dict[str, dict[str, str]] | None = None):
    conf = tmp_path / "docker.json"
    if not conf.exists():
        conf.write_text("{}")
    cfg = C.from_dict({"version": 1, "root": str(tmp_path / "root"),
                       "remote": {"docker_config": str(conf), "auth": {"credential_renewal_interval": "1s"}}})
    manager = FakeManager()
    sn = types.SimpleNamespace(
        config=cfg, instance_refs=lambda: dict(refs),
        credentials=types.SimpleNamespace(labels_for=lambda ref: dict((label_creds or {}).get(ref, {}))),
        rafs=types.SimpleNamespace(manager=manager))
    return sn, manager, conf


def _docker(conf, password: str | None) -> str:
    auths = {}
    if password is not None:
        auths[HOST] = {"auth": base64.b64encode(f"bob:{password}".encode()).decode()}
    conf.write_text(json.dumps({"auths": auths}))
    return base64.b64encode(f"bob:{password}".encode()).decode()


def test_docker_config_credentials_are_handed_over_when_they_change(tmp_path):
    sn, mgr, conf = _sn(tmp_path, {"m1": REF})
    first = _docker(conf, "one")
    r = CredentialRenewal(sn)
    assert r.renew_once() == {"m1": "renewed"}
    assert r.renew_once() == {"m1": "unchanged"}
    second = _docker(conf, "two")
    assert r.renew_once() == {"m1": "renewed"}
    assert [a for _, a in mgr.calls] == [first, first, second]
    counts, tracked = r.snapshot()
    assert counts == {(REF, "success"): 3} and tracked == {REF}


def test_pull_labels_and_anonymous_images_are_left_alone(tmp_path):
    secret = {L.PULL_USERNAME: "cri-user", L.PULL_SECRET: "cri-secret"}
    sn, mgr, conf = _sn(tmp_path, {"m1": REF, "m2": "other.test/x:1"}, label_creds={REF: secret})
    _docker(conf, "docker-pw")  # would answer for HOST, but the pull's own credentials win, as at mount
    r = CredentialRenewal(sn)
    assert r.renew_once() == {"m1": "skipped", "m2": "skipped"}
    assert mgr.calls == [] and r.snapshot() == ({}, set())


def test_a_source_that_stops_answering_counts_a_failure_and_keeps_the_credentials(tmp_path, caplog):
    sn, mgr, conf = _sn(tmp_path, {"m1": REF})
    _docker(conf, "one")
    r = CredentialRenewal(sn)
    assert r.renew_once() == {"m1": "renewed"}
    _docker(conf, None)  # the entry is gone: nothing is handed over, the instance keeps "one"
    assert r.renew_once() == {"m1": "failed"}
    assert len(mgr.calls) == 1
    assert r.snapshot()[0] == {(REF, "success"): 1, (REF, "failure"): 1}
    assert "keeps its credentials" in caplog.text and "one" not in caplog.text.split("failed")[-1]


def test_one_failing_instance_does_not_stop_the_others_and_gone_refs_are_dropped(tmp_path):
    refs = {"m1": REF, "m2": f"{HOST}/team/other:2"}
    sn, mgr, conf = _sn(tmp_path, refs)
    _docker(conf, "one")
    mgr.fail.add("m1")
    r = CredentialRenewal(sn)
    assert r.renew_once() == {"m1": "failed", "m2": "renewed"}
    refs.pop("m1")
    sn.instance_refs = lambda: dict(refs)
    r.renew_once()
    counts, tracked = r.snapshot()
    assert tracked == {f"{HOST}/team/other:2"} and all(ref != REF for ref, _ in counts)


def test_metrics_use_upstream_names(tmp_path):
    from snapshotter.metrics import _renewal_metrics

    sn, _, conf = _sn(tmp_path, {"m1": REF})
    _docker(conf, "one")
    sn.renewal = CredentialRenewal(sn)
    sn.renewal.renew_once()

    class Col:
        def collect(self):
            return _renewal_metrics(sn)

    reg = CollectorRegistry()
    reg.register(Col())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}
    assert samples[("snapshotter_credential_renewals_total", (("image_ref", REF), ("result", "success")))] == 1
    assert samples[("snapshotter_credential_store_entries", (("image_ref", REF),))] == 1


def test_the_loop_runs_until_stopped(tmp_path):
    sn, mgr, conf = _sn(tmp_path, {"m1": REF})
    _docker(conf, "one")
    stop = threading.Event()
    thread = CredentialRenewal(sn).start(0.05, stop)
    for _ in range(100):
        if len(mgr.calls) >= 2:
            break
        threading.Event().wait(0.05)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and len(mgr.calls) >= 2


def test_interval_is_a_go_duration(tmp_path):
    base = {"version": 1, "root": str(tmp_path)}
    assert C.from_dict({**base, "remote": {"auth": {"credential_renewal_interval": "1h30m"}}}).remote.auth.renewal_seconds == 5400
    assert C.from_dict(base).remote.auth.renewal_seconds == 0
    with pytest.raises(C.ConfigError, match="credential_renewal_interval: not a duration"):
        C.from_dict({**base, "remote": {"auth": {"credential_renewal_interval": "soon"}}})
