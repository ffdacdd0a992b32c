"""Credential renewal: upstream's ``[remote.auth] credential_renewal_interval``.

Registry credentials from a kubelet credential provider or a docker credential helper expire
(ECR tokens after 12 h, GCR and ACR access tokens sooner), while a running container reads its
image lazily for as long as it runs. Every ``credential_renewal_interval`` the snapshotter asks
those sources again for the image of each mounted RAFS instance and, when the answer changed,
hands it to the instance's nydusd (``PUT /api/v1/config``, through
``DaemonManager.update_auth``): no remount, the next backend request uses it.

As upstream, only instances whose credentials came from a renewable source are renewed: the
pull's own credentials (CRI labels) and the static ``[remote.auths]`` cannot change while an
instance runs, and an anonymous image has nothing to renew. An instance whose source stops
answering keeps the credentials it has (a failure is counted and logged, never applied).

Metrics (upstream's names): ``snapshotter_credential_renewals_total{image_ref,result}`` with
``result`` ``success``/``failure``, ``snapshotter_credential_store_entries{image_ref}``.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.errors import SnapshotterError
from snapshotter.instances import Instances
from snapshotter.pull_credentials import CredentialStore
from snapshotter.remote import RENEWABLE_SOURCES, resolve_credentials

log = logging.getLogger("snapshotter")


class RenewalSource(Protocol):
    """What renewal needs of the snapshotter (``snapshotter.snapshot.Snapshotter``)."""

    config: Config
    credentials: CredentialStore  #: the pull's own credentials (CRI labels), which are not renewed
    rafs: Instances

    def instance_refs(self) -> dict[str, str]:
        """Mounted RAFS instances: instance id → image reference."""


class CredentialRenewal:
    """One snapshotter's renewal: :meth:`renew_once` is a pass, :meth:`start` the periodic loop."""

    def __init__(self, sn: RenewalSource) -> None:
        self.sn = sn
        self._lock = threading.Lock()
        self._tracked: set[str] = set()                 #: image refs with a renewable source
        self.counts: dict[tuple[str, str], int] = {}    #: (image ref, success|failure) -> attempts

    def renew_once(self) -> dict[str, str]:
        """Ask the renewable sources again for every mounted instance's image; returns instance id
        → ``renewed`` (new credentials handed over), ``unchanged``, ``skipped`` (not from a
        renewable source) or ``failed``."""
        outcome: dict[str, str] = {}
        refs = self.sn.instance_refs()
        live: set[str] = set()
        for iid, ref in sorted(refs.items()):
            live.add(ref)
            outcome[iid] = self._renew(iid, ref)
        with self._lock:  # refs no mounted instance serves any more leave the store
            for ref in self._tracked - live:
                self._tracked.discard(ref)
                self.counts.pop((ref, "success"), None)
                self.counts.pop((ref, "failure"), None)
        return outcome

    def _renew(self, iid: str, ref: str) -> str:
        try:
            host = L.parse_image_ref(ref).host
            labels = {L.CRI_IMAGE_REF: ref, **self.sn.credentials.labels_for(ref)}
            creds, source = resolve_credentials(host, labels, self.sn.config)
        except (SnapshotterError, ValueError) as exc:
            return self._failed(iid, ref, str(exc))
        if source not in RENEWABLE_SOURCES or creds is None:
            with self._lock:
                tracked = ref in self._tracked
            if tracked:  # its renewable source had credentials before and has none now
                return self._failed(iid, ref, "no renewable credential source answers for it any more")
            return "skipped"
        try:
            changed = self.sn.rafs.manager.update_auth(iid, creds.auth())
        except Exception as exc:  # noqa: BLE001 - one instance's failure must not stop the others
            return self._failed(iid, ref, f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._tracked.add(ref)
            self.counts[(ref, "success")] = self.counts.get((ref, "success"), 0) + 1
        if changed:
            log.info("registry credentials of RAFS instance %s (%s) renewed from %s", iid, ref, source)
            return "renewed"
        return "unchanged"

    def _failed(self, iid: str, ref: str, why: str) -> str:
        log.warning("credential renewal of RAFS instance %s (%s) failed, it keeps its credentials: %s",
                    iid, ref, why.splitlines()[0][:300] if why else "unknown")
        with self._lock:
            self._tracked.add(ref)
            self.counts[(ref, "failure")] = self.counts.get((ref, "failure"), 0) + 1
        return "failed"

    def snapshot(self) -> tuple[dict[tuple[str, str], int], set[str]]:
        """(attempts by (image ref, result), tracked image refs) for the metrics."""
        with self._lock:
            return dict(self.counts), set(self._tracked)

    def start(self, interval: float, stop: threading.Event) -> threading.Thread:
        """Run :meth:`renew_once` every ``interval`` seconds until ``stop`` is set."""

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.renew_once()
                except Exception:  # noqa: BLE001 - the loop outlives a bad pass
                    log.exception("credential renewal pass failed")

        thread = threading.Thread(target=loop, name="credential-renewal", daemon=True)
        thread.start()
        return thread
