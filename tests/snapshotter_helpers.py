"""Shared fixtures for the snapshotter tests: an in-process gRPC server on a unix socket."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.config import Config, RemoteConfig
from snapshotter.service import serve
from snapshotter.snapshot import Snapshotter


@dataclass
class FakeInstance:
    mountpoint: str
    bootstrap: str
    backend_config: dict
    state: str = "RUNNING"


@dataclass
class FakeManager:
    """Stands in for rafs.daemon.manager.DaemonManager (docs/contracts.md) in unit tests."""

    calls: list[tuple] = field(default_factory=list)
    live: dict[str, FakeInstance] = field(default_factory=dict)
    fail_mount: Exception | None = None

    def mount(self, instance_id: str, bootstrap: str, mountpoint_hint: str | None, backend_config: dict) -> str:
        self.calls.append(("mount", instance_id, bootstrap, mountpoint_hint, backend_config))
        if self.fail_mount is not None:
            raise self.fail_mount
        assert mountpoint_hint
        os.makedirs(mountpoint_hint, exist_ok=True)
        self.live[instance_id] = FakeInstance(mountpoint_hint, bootstrap, backend_config)
        return mountpoint_hint

    def umount(self, instance_id: str) -> None:
        self.calls.append(("umount", instance_id))
        self.live.pop(instance_id)

    def instances(self) -> dict[str, Any]:
        return dict(self.live)

    def recover(self) -> None:
        self.calls.append(("recover",))

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))

    def ops(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


class Harness:
    """A Snapshotter served over a real gRPC channel."""

    def __init__(self, tmp_path, manager: FakeManager | None = None, **cfg_changes: Any) -> None:
        self.tmp_path = tmp_path
        self.root = str(tmp_path / "root")
        self.address = str(tmp_path / "snap.sock")
        remote = cfg_changes.pop("remote", RemoteConfig(check_registry=True))  # ping is faked
        self.config = Config(root=self.root, address=self.address, remote=remote, **cfg_changes)
        self.manager = manager
        self.ping_errors: dict[str, str] = {}
        self.start()

    def _ping(self, scheme: str, host: str, timeout: float) -> str | None:
        return self.ping_errors.get(host)

    def start(self) -> None:
        self.sn = Snapshotter(self.config, manager=self.manager, ping=self._ping)
        self.sn.start()
        self.server = serve(self.sn, self.address)
        self.channel = grpc.insecure_channel(f"unix:{self.address}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        self.sn.close()

    def restart(self, **changes: Any) -> None:
        self.stop()
        if changes:
            self.config = dataclasses.replace(self.config, **changes)
        self.start()

    # convenience wrappers
    def prepare(self, key: str, parent: str = "", labels: dict | None = None):
        return self.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="nydus", key=key, parent=parent,
                                                           labels=labels or {})).mounts

    def view(self, key: str, parent: str = "", labels: dict | None = None):
        return self.stub.View(pb.ViewSnapshotRequest(snapshotter="nydus", key=key, parent=parent,
                                                     labels=labels or {})).mounts

    def mounts(self, key: str):
        return self.stub.Mounts(pb.MountsRequest(snapshotter="nydus", key=key)).mounts

    def commit(self, name: str, key: str, labels: dict | None = None) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(snapshotter="nydus", name=name, key=key, labels=labels or {}))

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter="nydus", key=key))

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter="nydus", key=key)).info

    def usage(self, key: str) -> pb.UsageResponse:
        return self.stub.Usage(pb.UsageRequest(snapshotter="nydus", key=key))

    def list(self, *filters: str) -> list[str]:
        return sorted(i.name for r in self.stub.List(pb.ListSnapshotsRequest(snapshotter="nydus",
                                                                            filters=list(filters)))
                      for i in r.info)

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter="nydus"))


def code_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("call succeeded, an error was expected")
