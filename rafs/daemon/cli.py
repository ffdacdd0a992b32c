"""``nydusd``: serve RAFS images over FUSE or kernel EROFS (drop-in for common upstream use).

    nydusd [fuse] --config cfg.json --bootstrap image.boot --mountpoint /mnt --apisock api.sock
    nydusd [fuse] --mountpoint /mnt --apisock api.sock        # shared: mount via the API
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import trio

from rafs.daemon.config import DaemonConfig
from rafs.daemon.service import DEFAULT_FUSE_IMPL, FS_DRIVERS, FUSE_IMPLS, Nydusd, Opener
from rafs.errors import RafsError
from rafs.cli_common import VersionAction

LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusd",
        description="Nydus image service daemon: mounts RAFS images lazily over FUSE or kernel EROFS.",
    )
    p.add_argument("--version", "-V", action=VersionAction, prog_name="nydusd")
    p.add_argument("subcommand", nargs="?", choices=["fuse", "singleton"], default="fuse",
                   help="daemon kind: 'fuse' (default); 'singleton' (fscache) is refused with the reason")
    p.add_argument("--config", "-C", help="nydusd JSON config (backend, cache, prefetch)")
    p.add_argument("--bootstrap", "-B", help="RAFS bootstrap; omit to start a shared daemon")
    p.add_argument("--mountpoint", "-M", help="where to mount (required for fuse)")
    p.add_argument("--fscache", help=argparse.SUPPRESS)
    p.add_argument("--apisock", "-A", help="unix socket of the HTTP control API")
    p.add_argument("--id", default="", help="daemon id (reported by the API)")
    p.add_argument("--log-level", "-l", default="info", choices=sorted(LOG_LEVELS))
    p.add_argument("--log-file", "-L", help="log to this file instead of stderr")
    p.add_argument("--thread-num", "-T", type=int, default=0, help="worker threads for blob IO")
    p.add_argument("--fs-driver", default="fusedev", choices=FS_DRIVERS,
                   help="fusedev (default, as upstream) or erofs (kernel EROFS, v6 4 KiB aligned images)")
    p.add_argument("--blob-dir", help="erofs driver: where the FUSE blob files are served "
                                      "(default <mountpoint>.blobs)")
    p.add_argument("--fuse-no-open", choices=["auto", "on", "off"], default="auto",
                   help="answer FUSE open with ENOSYS so the kernel stops sending open/release "
                        "(auto: when pyfuse3 carries misc/pyfuse3/read-ino.patch and the kernel "
                        "is 4.20+; fusedev only: the erofs driver's blob files answer open "
                        "with direct I/O)")
    p.add_argument("--fuse-impl", choices=list(FUSE_IMPLS), default=DEFAULT_FUSE_IMPL,
                   help="FUSE session: 'll' (own loop over /dev/fuse, worker threads with cloned "
                        "fds) or 'pyfuse3' (libfuse); see docs/mounts.md")
    p.add_argument("--prefetch-files", nargs="*", default=None, help="files to prefetch after mount")
    p.add_argument("--daemon", "-D", action="store_true", help="detach once RUNNING")
    p.add_argument("--supervisor", help="unix socket of the FUSE fd holder: the daemon sends its "
                                        "/dev/fuse fds and handover state there (own FUSE loop only)")
    p.add_argument("--upgrade", action="store_true",
                   help="successor of a daemon whose FUSE session --supervisor holds: serve only the API "
                        "in state INIT until PUT /api/v1/daemon/fuse/takeover (adopt the session and its "
                        "instances: READY) and PUT /api/v1/daemon/start (RUNNING), as upstream")
    p.add_argument("--failover-policy", choices=["resend", "flush"], default="resend",
                   help="with --upgrade: requests the previous daemon had taken are served again "
                        "(resend) or answered EIO (flush)")
    p.add_argument("--log-rotation-size", help=argparse.SUPPRESS)
    return p


def _setup_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level])


def _detach(log_file: str | None) -> int | None:
    """Fork; the parent waits for the child's ready byte and returns its exit status."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        ready = os.read(r, 1)
        os.close(r)
        if ready == b"1":
            return 0
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if log_file:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.environ["_NYDUSD_READY_FD"] = str(w)
    return None


def _fail(log: logging.Logger, log_file: str | None, exc: BaseException) -> None:
    """One line: into the log, and on stderr too when the log goes to a file."""
    log.error("%s", exc)
    if log_file:
        print(f"nydusd: {exc}", file=sys.stderr)


def _bootstrap_problem(path: str) -> str | None:
    """Why ``path`` cannot be a RAFS bootstrap (missing, unreadable, no magic), checked before
    anything is mounted; None when it looks like one."""
    from rafs.base import detect_version  # noqa: PLC0415

    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if detect_version(head) is None:
        return "not a RAFS bootstrap (no v5 magic at 0 or EROFS magic at 1024)"
    return None


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (else the group)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _preimport() -> None:
    """Import what the first mount needs (reader, storage, registry client: ~0.13 s) while the
    daemon waits for it, instead of inside that mount."""
    import rafs.daemon.device  # noqa: F401, PLC0415
    import rafs.metadata  # noqa: F401, PLC0415
    import storage.backend.config  # noqa: F401, PLC0415
    import storage.cache  # noqa: F401, PLC0415


def main(argv: list[str] | None = None, *, opener: Opener | None = None) -> int:
    """Run nydusd; ``opener`` replaces the bootstrap/device opener (tests only)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subcommand == "singleton":
        from rafs.erofs import detect_support

        sup = detect_support()
        reason = sup.reason if not sup.ondemand else "the fscache daemon mode is not implemented by this nydusd"
        print(f"nydusd: singleton/fscache mode unavailable: {reason}", file=sys.stderr)
        return 2
    if not args.mountpoint:
        parser.error("--mountpoint is required")
    if args.log_rotation_size:
        print("nydusd: warning: --log-rotation-size is accepted but not supported here (ignored)",
              file=sys.stderr)
    if args.daemon:
        code = _detach(args.log_file)
        if code is not None:
            return code
    _setup_logging(args.log_level, args.log_file)
    log = logging.getLogger("nydusd")
    ready_fd = int(os.environ.pop("_NYDUSD_READY_FD", "-1"))
    try:
        config = DaemonConfig.load(args.config).raw if args.config else {}
        problem = _bootstrap_problem(args.bootstrap) if args.bootstrap is not None and opener is None else None
        if problem:   # checked before anything is mounted
            raise RafsError(f"--bootstrap {args.bootstrap}: {problem}; pass the image's RAFS bootstrap "
                            "(the file nydus-image create -B writes)")
        if args.bootstrap is None and not args.apisock:
            raise RafsError("a shared daemon (no --bootstrap) needs --apisock to receive mounts")
        if args.upgrade and not (args.supervisor and args.apisock):
            raise RafsError("--upgrade needs --supervisor (where the FUSE session is held) and --apisock "
                            "(the takeover and start requests come through the API)")
        daemon = Nydusd(mountpoint=args.mountpoint, apisock=args.apisock, fs_driver=args.fs_driver,
                        daemon_id=args.id, blob_dir=args.blob_dir, thread_num=args.thread_num,
                        opener=opener,
                        fuse_no_open={"auto": None, "on": True, "off": False}[args.fuse_no_open],
                        fuse_impl=args.fuse_impl, supervisor=args.supervisor,
                        upgrade=args.upgrade, failover_policy=args.failover_policy)

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: daemon.run(args.bootstrap, config, task_status=task_status))
                if opener is None and args.bootstrap is None:  # a shared daemon waiting for mounts
                    threading.Thread(target=_preimport, name="preimport", daemon=True).start()
                if args.prefetch_files and args.bootstrap:
                    await daemon.prefetch("/", args.prefetch_files)
                if ready_fd >= 0:
                    os.write(ready_fd, b"1")
                    os.close(ready_fd)

        try:
            trio.run(run)
        except BaseExceptionGroup as group:   # a task's error, wrapped by trio's nurseries
            leaf = _single_leaf(group)
            if isinstance(leaf, (RafsError, OSError)):
                raise leaf from None
            raise
    except RafsError as exc:
        _fail(log, args.log_file, exc)
        return 2
    except OSError as exc:
        _fail(log, args.log_file, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
