"""Pull credentials given as snapshot labels, kept out of the metastore.

containerd's CRI plugin passes registry credentials to a remote snapshotter as the labels
``containerd.io/snapshot/pullusername`` / ``pullsecret`` on the Prepare calls of a pull. They are
needed later, when a container's rootfs Prepare mounts the image (that call carries no
credentials), and after a snapshotter restart. They are never stored as labels (the metastore
drops them, so Stat/List/Walk never return them) and never logged: this store keeps the latest
pair per image repository (``host/repo``) in ``<root>/credentials.json``, mode 0600, written
temp + rename.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping

from snapshotter import labels as L
from storage.atomic import atomic_write

log = logging.getLogger(__name__)


def _repo_key(image_ref: str) -> str:
    ref = L.parse_image_ref(image_ref)
    return f"{ref.host}/{ref.repo}"


class CredentialStore:
    """``{host/repo: [username, secret]}`` in one 0600 JSON file."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "credentials.json")
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[str]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, type(exc).__name__)
            return {}
        return data if isinstance(data, dict) else {}

    def remember(self, labels: Mapping[str, str]) -> None:
        """Keep the credential labels of a Prepare/Commit that names its image."""
        secret = labels.get(L.PULL_SECRET)
        ref = L.image_ref(labels)
        if not secret or not ref:
            return
        key = _repo_key(ref)
        pair = [labels.get(L.PULL_USERNAME, ""), secret]
        with self._lock:
            data = self._load()
            if data.get(key) == pair:
                return
            data[key] = pair
            atomic_write(self.path, json.dumps(data, sort_keys=True), perms=0o600)

    def labels_for(self, image_ref: str) -> dict[str, str]:
        """The credential labels remembered for ``image_ref``'s repository ({} if none)."""
        with self._lock:
            pair = self._load().get(_repo_key(image_ref))
        if not isinstance(pair, list) or len(pair) != 2:
            return {}
        return {L.PULL_USERNAME: str(pair[0]), L.PULL_SECRET: str(pair[1])}
