"""``nydusctl``: pull and run images through containerd the way CRI/nerdctl do, and query a
nydusd daemon's API.

    nydusctl --address /run/containerd/containerd.sock pull IMAGE
    nydusctl --address ... run [--snapshotter nydus] IMAGE [CMD...]
    nydusctl --api-sock /run/nydus/xxx/api.sock info|metrics
    nydusctl trace --root /var/lib/containerd-nydus [--id INSTANCE] [-o FILE]

``pull`` goes through containerd's CRI ImageService (``runtime.v1.ImageService/PullImage``), the
``client.Pull(..., WithPullUnpack)`` path that hands ``containerd.io/snapshot/*`` and ``cri.*``
labels to the snapshotter (``ctr image pull`` passes none, so nydus layers could not be lazy).
Exit codes: 0 ok, 1 the operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import uuid
from typing import Any, Sequence

from snapshotter.errors import SnapshotterError
from rafs.cli_common import VersionAction
from rafs.daemon.client import UnixHTTPConnection

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
CRI_NAMESPACE = "k8s.io"


class CtlError(SnapshotterError):
    """A ``nydusctl`` operation failed (containerd, CRI or the daemon API answered an error)."""


# ---------------------------------------------------------------------------------------------
# CRI ImageService client
# ---------------------------------------------------------------------------------------------
class CriImageClient:
    """Thin client of CRI ``runtime.v1.ImageService`` on containerd's gRPC socket."""

    def __init__(self, address: str, timeout: float = 300.0) -> None:
        import grpc

        from protos.cri import api_pb2, api_pb2_grpc

        if not os.path.exists(address):
            raise CtlError(f"containerd socket {address} does not exist (is containerd running? "
                           f"use --address)")
        self._grpc = grpc
        self._pb = api_pb2
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel("unix://" + os.path.abspath(address))
        self._stub = api_pb2_grpc.ImageServiceStub(self._channel)

    def _call(self, what: str, fn: Any, req: Any) -> Any:
        try:
            return fn(req, timeout=self.timeout)
        except self._grpc.RpcError as e:  # type: ignore[attr-defined]
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            detail = e.details() if hasattr(e, "details") else str(e)
            raise CtlError(f"{what}: {code}: {detail}") from None

    def pull_image(self, ref: str, *, username: str | None = None,
                   password: str | None = None, annotations: dict[str, str] | None = None) -> str:
        """Pull (and unpack with the CRI snapshotter); returns the image id (``sha256:...``)."""
        auth = None
        if username is not None:
            auth = self._pb.AuthConfig(username=username, password=password or "")
        req = self._pb.PullImageRequest(
            image=self._pb.ImageSpec(image=ref, annotations=annotations or {}), auth=auth)
        return str(self._call(f"pull {ref}", self._stub.PullImage, req).image_ref)

    def image_status(self, ref: str) -> Any | None:
        """The CRI ``Image`` record, or None if containerd does not have it."""
        req = self._pb.ImageStatusRequest(image=self._pb.ImageSpec(image=ref))
        resp = self._call(f"status of {ref}", self._stub.ImageStatus, req)
        return resp.image if resp.HasField("image") and resp.image.id else None

    def list_images(self) -> list[Any]:
        return list(self._call("list images", self._stub.ListImages,
                               self._pb.ListImagesRequest()).images)

    def remove_image(self, ref: str) -> None:
        req = self._pb.RemoveImageRequest(image=self._pb.ImageSpec(image=ref))
        self._call(f"remove {ref}", self._stub.RemoveImage, req)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CriImageClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# nydusd daemon API (HTTP over a unix socket)
# ---------------------------------------------------------------------------------------------
def daemon_api_get(api_sock: str, path: str, timeout: float = 10.0, *, method: str = "GET",
                   body: Any = None) -> Any:
    """``method`` ``path`` on a nydusd API socket (JSON ``body``); returns the decoded answer."""
    if not os.path.exists(api_sock):
        raise CtlError(f"daemon API socket {api_sock} does not exist")
    conn = UnixHTTPConnection(api_sock, timeout)
    try:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise CtlError(f"daemon API {api_sock}: {e.strerror or e}") from None
    finally:
        conn.close()
    if resp.status // 100 != 2:
        raise CtlError(f"daemon API {method} {path}: HTTP {resp.status} "
                       f"{body.decode(errors='replace')[:500]}")
    if not body:
        return None
    ctype = resp.getheader("Content-Type", "") or ""
    try:
        return json.loads(body)
    except ValueError:
        if "json" in ctype:
            raise CtlError(f"daemon API GET {path}: bad JSON: {body[:200]!r}") from None
        return body.decode("utf-8", "surrogateescape")   # Prometheus metrics, prefetch traces


METRICS_PATHS = {"fs": "/api/v1/metrics", "backend": "/api/v1/metrics/backend",
                 "blobcache": "/api/v1/metrics/blobcache", "files": "/api/v1/metrics/files",
                 "pattern": "/api/v1/metrics/pattern", "inflight": "/api/v1/metrics/inflight"}
#: upstream nydusctl's ``metrics <category>`` -> --kind
METRICS_CATEGORIES = {"backend": "backend", "cache": "blobcache", "fsstats": "fs"}


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _split_user(user: str | None) -> tuple[str | None, str | None]:
    if user is None:
        return None, None
    name, sep, password = user.partition(":")
    if not sep:
        raise CtlError("--user must be USER:PASSWORD")
    return name, password


def cmd_pull(args: argparse.Namespace) -> int:
    username, password = _split_user(args.user)
    t0 = time.monotonic()
    with CriImageClient(args.address, timeout=args.timeout) as cri:
        image_id = cri.pull_image(args.image, username=username, password=password)
    if not args.quiet:
        print(f"pulled {args.image} -> {image_id} in {time.monotonic() - t0:.2f}s "
              f"(CRI ImageService, snapshotter from containerd's CRI config)", file=sys.stderr)
    print(image_id)
    return 0


def _ctr() -> str:
    ctr = shutil.which("ctr")
    if ctr is None:
        raise CtlError("ctr not found in PATH (Debian package containerd)")
    return ctr


def cmd_run(args: argparse.Namespace) -> int:
    username, password = _split_user(args.user)
    with CriImageClient(args.address, timeout=args.timeout) as cri:
        if args.pull == "always" or (args.pull == "missing" and cri.image_status(args.image) is None):
            t0 = time.monotonic()
            image_id = cri.pull_image(args.image, username=username, password=password)
            if not args.quiet:
                print(f"pulled {args.image} -> {image_id} in {time.monotonic() - t0:.2f}s",
                      file=sys.stderr)
        elif cri.image_status(args.image) is None:
            raise CtlError(f"image {args.image} is not present and --pull=never")
    cid = args.id or f"nydusctl-{uuid.uuid4().hex[:12]}"
    argv = [_ctr(), "--address", args.address, "-n", args.namespace, "run", "--rm",
            "--snapshotter", args.snapshotter]
    if args.cgroup is not None:
        argv += ["--cgroup", args.cgroup]
    if args.net_host:
        argv.append("--net-host")
    for env in args.env:
        argv += ["--env", env]
    argv += [args.image, cid, *args.command]
    # ctr streams the container's stdio to ours; its exit status is the container's
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL if not args.interactive else None)
    return proc.returncode


def cmd_images(args: argparse.Namespace) -> int:
    with CriImageClient(args.address, timeout=args.timeout) as cri:
        for img in cri.list_images():
            tags = ",".join(img.repo_tags) or "<none>"
            print(f"{img.id}\t{tags}\t{img.size}")
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    with CriImageClient(args.address, timeout=args.timeout) as cri:
        for image in args.images:
            if cri.image_status(image) is None:
                raise CtlError(f"image {image} not found")
            cri.remove_image(image)
            print(f"removed {image}")
    return 0


def _sock(args: argparse.Namespace) -> str:
    sock = getattr(args, "api_sock", None) or args.sock
    if not sock:
        raise CtlError(f"{args.cmd}: the daemon's API socket is required (-S/--sock or --api-sock)")
    return sock


def cmd_info(args: argparse.Namespace) -> int:
    info = daemon_api_get(_sock(args), "/api/v1/daemon", args.timeout)
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    kind = METRICS_CATEGORIES[args.category] if args.category else args.kind
    path = METRICS_PATHS[kind]
    if args.id and kind != "inflight":
        path += "?id=" + urllib.parse.quote(args.id, safe="/")
    while True:
        res = daemon_api_get(_sock(args), path, args.timeout)
        if res is None and kind == "inflight":
            res = []  # 204: no request in flight
        if isinstance(res, str):
            sys.stdout.write(res if res.endswith("\n") else res + "\n")
        else:
            print(json.dumps(res, indent=2, sort_keys=True))
        sys.stdout.flush()
        if not args.interval:
            return 0
        time.sleep(args.interval)


def cmd_set(args: argparse.Namespace) -> int:
    daemon_api_get(_sock(args), "/api/v1/daemon", args.timeout, method="PUT", body={"log_level": args.value})
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    try:
        with open(args.config, encoding="utf-8") as f:
            config = f.read()
    except OSError as e:
        raise CtlError(f"--config {args.config}: {e.strerror}") from None
    q = urllib.parse.urlencode({"mountpoint": args.mountpoint})
    daemon_api_get(_sock(args), f"/api/v1/mount?{q}", args.timeout, method="POST",
                   body={"fs_type": args.type, "source": os.path.abspath(args.source), "config": config})
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    q = urllib.parse.urlencode({"mountpoint": args.mountpoint})
    daemon_api_get(_sock(args), f"/api/v1/mount?{q}", args.timeout, method="DELETE")
    return 0


def trace_sources(root: str) -> list[tuple[str, str, str]]:
    """``(instance id, API socket, API mountpoint)`` of every RAFS instance the snapshotter's
    daemons serve, from their records in ``<root>/daemons/*.json``."""
    out: list[tuple[str, str, str]] = []
    ddir = os.path.join(root, "daemons")
    try:
        names = sorted(os.listdir(ddir))
    except OSError as e:
        raise CtlError(f"cannot list {ddir}: {e.strerror or e}") from None
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(ddir, name), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        for inst in sorted(rec.get("instances") or {}):
            mountpoint = f"/{inst}" if rec.get("shared", True) else "/"
            out.append((inst, rec.get("apisock", ""), mountpoint))
    return out


def _live_trace(api_sock: str, mountpoint: str, timeout: float) -> str:
    path = "/api/v1/trace?" + urllib.parse.urlencode({"mountpoint": mountpoint})
    text = daemon_api_get(api_sock, path, timeout)
    if not isinstance(text, str):
        raise CtlError(f"daemon API GET {path}: expected a text trace, got {type(text).__name__}")
    return text


def _trace_from_root(root: str, instance: str | None, timeout: float) -> str:
    """A mounted instance's trace from its daemon, else the file its daemon wrote when the
    instance was unmounted (``<root>/traces/<instance>.trace``)."""
    live = [t for t in trace_sources(root) if instance in (None, t[0])]
    tdir = os.path.join(root, "traces")
    saved = sorted(n[:-len(".trace")] for n in (os.listdir(tdir) if os.path.isdir(tdir) else [])
                   if n.endswith(".trace") and instance in (None, n[:-len(".trace")]))
    if len(live) == 1:
        return _live_trace(live[0][1], live[0][2], timeout)
    if len(live) > 1:
        raise CtlError("several RAFS instances, choose one with --id: " + ", ".join(t[0] for t in live))
    if len(saved) > 1:
        raise CtlError(f"several saved traces in {tdir}, choose one with --id: " + ", ".join(saved))
    if not saved:
        raise CtlError(f"no RAFS instance{' ' + instance if instance else ''} in {root}/daemons "
                       f"and no saved trace in {tdir} (is [prefetch] record_trace on?)")
    with open(os.path.join(tdir, saved[0] + ".trace"), encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def cmd_trace(args: argparse.Namespace) -> int:
    if args.api_sock:
        api_sock, mountpoint = args.api_sock, "/" + args.id.strip("/") if args.id else "/"
        text = _live_trace(api_sock, mountpoint, args.timeout)
    else:
        text = _trace_from_root(args.root, args.id, args.timeout)
    if args.output:
        from storage.atomic import atomic_write

        atomic_write(args.output, text.encode("utf-8", "surrogateescape"))
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
        sys.stdout.flush()
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from snapshotter import snapctl

    return snapctl.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusctl",
        description="Pull/run images through containerd's CRI (so the nydus snapshotter gets the "
                    "labels that make layers lazy) and query nydusd daemons.",
        epilog="exit status: 0 ok, 1 the operation failed, 2 usage error; "
               "'run' exits with the container's status.")
    p.add_argument("--address", "-a", default=os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS),
                   help="containerd socket (env CONTAINERD_ADDRESS; default %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per API call")
    p.add_argument("--version", action=VersionAction, prog_name="nydusctl")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--sock", "-S", help="nydusd API unix socket (upstream nydusctl's flag) for "
                                        "info, metrics, set, mount, umount")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    sp = sub.add_parser("pull", help="pull IMAGE through the CRI ImageService; prints the image id")
    sp.add_argument("image")
    sp.add_argument("--user", "-u", help="registry credentials USER:PASSWORD")
    sp.set_defaults(func=cmd_pull)

    sr = sub.add_parser("run", help="pull IMAGE if needed (CRI) and run CMD in a container "
                                    "(ctr run --rm --snapshotter SNAPSHOTTER)")
    sr.add_argument("--snapshotter", default="nydus", help="default %(default)s")
    sr.add_argument("--namespace", "-n", default=CRI_NAMESPACE,
                    help="containerd namespace; CRI pulls land in k8s.io (default)")
    sr.add_argument("--pull", choices=("missing", "always", "never"), default="missing")
    sr.add_argument("--user", "-u", help="registry credentials USER:PASSWORD")
    sr.add_argument("--id", help="container id (default: random)")
    sr.add_argument("--env", "-e", action="append", default=[], help="KEY=VALUE (repeatable)")
    sr.add_argument("--net-host", action="store_true", help="use the host network")
    sr.add_argument("--cgroup", help="cgroup path for the container (ctr --cgroup)")
    sr.add_argument("--interactive", "-i", action="store_true", help="attach stdin")
    sr.add_argument("image")
    sr.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")
    sr.set_defaults(func=cmd_run)

    ss = sub.add_parser("snapshots", add_help=False,
                        help="inspect the nydus snapshotter itself: list/stat/usage/mounts/rm/cleanup "
                             "(see 'nydusctl snapshots --help')")
    ss.add_argument("rest", nargs=argparse.REMAINDER)
    ss.set_defaults(func=cmd_snapshots)

    si = sub.add_parser("images", help="list images known to CRI")
    si.set_defaults(func=cmd_images)
    sm = sub.add_parser("rmi", help="remove images through CRI")
    sm.add_argument("images", nargs="+")
    sm.set_defaults(func=cmd_rmi)

    st = sub.add_parser("trace", help="the prefetch trace a daemon recorded for an image "
                                      "([prefetch] record_trace); input of nydusify --prefetch-trace")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", help="the snapshotter's root: find the instance in its daemon records")
    where.add_argument("--api-sock", help="the daemon's API unix socket")
    st.add_argument("--id", help="RAFS instance id (required when there are several)")
    st.add_argument("--output", "-o", help="write the trace to this file (temp + rename)")
    st.set_defaults(func=cmd_trace)

    for name, func, hlp in (("info", cmd_info, "nydusd daemon info (GET /api/v1/daemon)"),
                            ("metrics", cmd_metrics, "nydusd metrics (GET /api/v1/metrics...; JSON or "
                                                "Prometheus text, printed as served)")):
        sd = sub.add_parser(name, help=hlp)
        sd.add_argument("--api-sock", help="the daemon's API unix socket (or -S/--sock before the command)")
        if name == "metrics":
            sd.add_argument("category", nargs="?", choices=sorted(METRICS_CATEGORIES),
                            help="upstream nydusctl's category: backend, cache (= --kind blobcache), "
                                 "fsstats (= --kind fs)")
            sd.add_argument("--kind", choices=sorted(METRICS_PATHS), default="fs")
            sd.add_argument("--id", help="RAFS instance id (shared daemons)")
            sd.add_argument("--interval", "-I", type=float, default=0,
                            help="print again every N seconds until interrupted")
        sd.set_defaults(func=func)
    sset = sub.add_parser("set", help="change a daemon setting (PUT /api/v1/daemon)")
    sset.add_argument("key", choices=["log-level"])
    sset.add_argument("value", choices=["trace", "debug", "info", "warn", "error"])
    sset.set_defaults(func=cmd_set)
    smo = sub.add_parser("mount", help="mount a RAFS instance in a shared daemon (POST /api/v1/mount)")
    smo.add_argument("--source", "-s", required=True, help="the RAFS bootstrap")
    smo.add_argument("--config", "-c", required=True, help="nydusd JSON config file")
    smo.add_argument("--mountpoint", "-m", required=True, help="instance path in the daemon, /<id>")
    smo.add_argument("--type", "-t", default="rafs", choices=["rafs"])
    smo.set_defaults(func=cmd_mount)
    sum_ = sub.add_parser("umount", help="unmount an instance (DELETE /api/v1/mount)")
    sum_.add_argument("--mountpoint", "-m", required=True)
    sum_.set_defaults(func=cmd_umount)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["snapshots"]:  # argparse cannot pass leading options through REMAINDER
        from snapshotter import snapctl

        return snapctl.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)       # exits 2 on usage errors
    if args.cmd in ("info", "metrics", "set", "mount", "umount") and not (
            getattr(args, "api_sock", None) or args.sock):
        print(f"nydusctl: {args.cmd}: the daemon's API socket is required (-S/--sock SOCK {args.cmd} "
              f"or {args.cmd} --api-sock SOCK)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except CtlError as e:
        print(f"nydusctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
