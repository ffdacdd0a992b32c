"""Real-stack test harness: a local docker-registry, containerd with a proxy snapshotter,
our snapshotter process, and small OCI images built without internet.

Every helper here starts real processes on 127.0.0.1 with OS-chosen ports, keeps its state in
a private temp dir, stops what it started by PID and removes the temp dir on exit.
"""

from __future__ import annotations


class HarnessError(RuntimeError):
    """A harness component failed to start, stop or answer."""
