"""The containerd Snapshots gRPC service for nydus images (and plain OCI layers).

This is the only module that maps :mod:`snapshotter.errors` to gRPC status codes. Messages
end the way containerd's ``errdefs`` renders them (``...: not found``) so that a Go client's
``errdefs.FromGRPC`` sees the same text as from containerd's own snapshotters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent import futures
from typing import Any, Callable, Iterator

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from protos.containerd.api.types import mount_pb2
from snapshotter import errors
from snapshotter.metastore import Info, Kind
from snapshotter.mounts import Mount
from snapshotter.snapshot import Snapshotter

log = logging.getLogger("snapshotter.service")

#: error class → (gRPC code, errdefs suffix); most specific first
ERROR_CODES: list[tuple[type[errors.SnapshotterError], grpc.StatusCode, str]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, "not found"),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "failed precondition"),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "invalid argument"),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, "unavailable"),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION, "failed precondition"),
]

LIST_BATCH = 100


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an exception raised by the Snapshotter."""
    for cls, code, suffix in ERROR_CODES:
        if isinstance(exc, cls):
            return code, f"{exc}: {suffix}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind), created_at=_ts(info.created),
                   updated_at=_ts(info.updated), labels=dict(info.labels))


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """Thin translation: request → one Snapshotter call → response; errors → status."""

    def __init__(self, snapshotter: Snapshotter, observe: Callable[[str, float, str], None] | None = None) -> None:
        self.sn = snapshotter
        self._observe = observe

    def _call(self, op: str, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        outcome = "ok"
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every error becomes a status here
            code, message = status_for(exc)
            outcome = code.name.lower()
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", op)
            else:
                log.info("%s: %s (%s)", op, message, code.name)
            context.abort(code, message)
        finally:
            elapsed = time.perf_counter() - t0
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s in %.3fms", op, outcome, elapsed * 1e3)
            if self._observe is not None:
                self._observe(op, elapsed, outcome)

    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self._call("prepare", context,
                            lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self._call("view", context,
                            lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        mounts = self._call("mounts", context, lambda: self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=mounts_to_pb(mounts))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call("commit", context, lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call("remove", context, lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        info = self._call("stat", context, lambda: self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        req = request.info
        info = Info(name=req.name, parent=req.parent, kind=Kind(req.kind) if req.kind in (0, 1, 2, 3) else Kind.UNKNOWN,
                    created=_ns(req.created_at), updated=_ns(req.updated_at), labels=dict(req.labels))
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = self._call("update", context, lambda: self.sn.update(info, paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(updated))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        infos = self._call("list", context, lambda: self.sn.walk(list(request.filters)))
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i:i + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        usage = self._call("usage", context, lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call("cleanup", context, self.sn.cleanup)
        return empty_pb2.Empty()


def serve(snapshotter: Snapshotter, address: str, *, max_workers: int = 16,
          observe: Callable[[str, float, str], None] | None = None, group: int | None = None) -> grpc.Server:
    """Start a gRPC server for ``snapshotter`` on unix socket ``address``: mode 0600, or 0660
    owned by gid ``group`` when given."""
    parent = os.path.dirname(os.path.abspath(address))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if os.path.lexists(address):
        os.unlink(address)  # a stale socket of a previous run
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="snapshots"),
                         options=[("grpc.max_receive_message_length", 16 << 20),
                                  ("grpc.max_send_message_length", 16 << 20)])
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter, observe), server)
    # bind at a private name, set owner and mode, then rename into place: a client never sees
    # the socket at ``address`` with anything but its final permissions
    tmp = os.path.join(parent, f".{os.path.basename(address)}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    old_umask = os.umask(0o177)
    try:
        port = server.add_insecure_port(f"unix:{tmp}")
    finally:
        os.umask(old_umask)
    if port == 0:
        raise errors.ConfigError(f"cannot listen on unix socket {address}")
    try:
        if group is None:
            os.chmod(tmp, 0o600)
        else:
            os.chown(tmp, -1, group)
            os.chmod(tmp, 0o660)
        os.rename(tmp, address)
    except OSError:
        server.stop(None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    server.start()
    return server
