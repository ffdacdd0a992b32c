"""``nydusctl snapshots``: inspect a running nydus-snapshotter over its gRPC socket (JSON output).

    nydusctl snapshots [--address SOCKET] list [FILTER ...] | stat KEY | usage KEY | mounts KEY | rm KEY | cleanup
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import grpc

from protos.containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from protos.containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.config import DEFAULT_ADDRESS

_KINDS = {0: "unknown", 1: "view", 2: "active", 3: "committed"}


def _info(i: pb.Info) -> dict:
    return {"name": i.name, "parent": i.parent, "kind": _KINDS.get(i.kind, str(i.kind)),
            "created": i.created_at.ToJsonString(), "updated": i.updated_at.ToJsonString(), "labels": dict(i.labels)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nydusctl snapshots", description="inspect a running nydus-snapshotter")
    ap.add_argument("--address", default=DEFAULT_ADDRESS, help="snapshotter gRPC socket")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="snapshots matching containerd filters (OR of the arguments)")
    p.add_argument("filters", nargs="*")
    for name in ("stat", "usage", "mounts", "rm"):
        sub.add_parser(name).add_argument("key")
    sub.add_parser("cleanup", help="remove orphan directories, unused RAFS instances and cache")
    args = ap.parse_args(argv)
    with grpc.insecure_channel(f"unix:{args.address}") as ch:
        stub = pb_grpc.SnapshotsStub(ch)
        try:
            if args.cmd == "list":
                out: object = [_info(i) for r in stub.List(pb.ListSnapshotsRequest(filters=args.filters))
                               for i in r.info]
            elif args.cmd == "stat":
                out = _info(stub.Stat(pb.StatSnapshotRequest(key=args.key)).info)
            elif args.cmd == "usage":
                u = stub.Usage(pb.UsageRequest(key=args.key))
                out = {"size": u.size, "inodes": u.inodes}
            elif args.cmd == "mounts":
                out = [{"type": m.type, "source": m.source, "options": list(m.options)}
                       for m in stub.Mounts(pb.MountsRequest(key=args.key)).mounts]
            elif args.cmd == "rm":
                stub.Remove(pb.RemoveSnapshotRequest(key=args.key))
                out = {"removed": args.key}
            else:
                stub.Cleanup(pb.CleanupRequest())
                out = {"cleanup": "done"}
        except grpc.RpcError as exc:
            print(f"nydusctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
