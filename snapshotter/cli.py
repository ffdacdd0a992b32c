"""``nydus-snapshotter``: the containerd proxy snapshotter service.

    nydus-snapshotter [serve] [--config FILE] [--root DIR] [--address SOCKET] [--log-level L] ...
    containerd-nydus-grpc --config FILE [--root DIR] [--address SOCKET] [--nydusd PATH] ...
    python3 -m snapshotter serve --root DIR --address SOCKET

Flags override the config file. SIGTERM/SIGINT stop serving cleanly (in-flight calls finish,
the socket is removed); RAFS instances stay mounted so running containers are unaffected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Sequence

from snapshotter import config as cfgmod
from snapshotter.errors import ConfigError, SnapshotterError
from rafs.cli_common import OneLineArgumentParser, VersionAction

log = logging.getLogger("snapshotter")

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level.lower()])


def build_parser(prog: str = "nydus-snapshotter") -> argparse.ArgumentParser:
    """The flags of ``nydus-snapshotter`` and ``containerd-nydus-grpc`` (upstream's binary name and
    flags; single-dash spellings such as ``-config`` work too, as with upstream)."""
    p = OneLineArgumentParser(
        prog=prog, description="containerd snapshotter for nydus images",
        epilog="commands: 'serve' (the default) runs the service. Exit status: 0 stopped cleanly, "
               "1 failed while running, 2 usage or configuration error.")
    if prog == "nydus-snapshotter":
        p.add_argument("command", nargs="?", choices=["serve"], help="serve: run the service (the default)")

    def flag(name: str, **kw) -> None:
        p.add_argument(f"--{name}", f"-{name}", **kw)

    flag("version", action=VersionAction, prog_name=prog)
    flag("config", help="TOML config file (version = 1; upstream's config.toml loads as is)")
    flag("root", help="state directory (overrides `root`)")
    flag("address", help="gRPC unix socket (overrides `address`)")
    flag("log-level", choices=sorted(_LEVELS), help="overrides [log] level")
    flag("log-format", choices=cfgmod.LOG_FORMATS, help="overrides [log] format")
    flag("log-to-stdout", action="store_true", help="log to stdout instead of stderr")
    flag("fs-driver", choices=cfgmod.FS_DRIVERS, help="overrides [daemon] fs_driver")
    flag("daemon-mode", choices=sorted({*cfgmod.DAEMON_MODES, *cfgmod.UPSTREAM_DAEMON_MODES}),
         help="overrides daemon_mode (\"multiple\" = \"dedicated\")")
    flag("nydusd", help="nydusd executable (overrides [daemon] nydusd_path)")
    flag("nydusd-config", help="nydusd JSON config template (overrides [daemon] nydusd_config)")
    flag("nydus-image", help="accepted for upstream compatibility; not used here (warns)")
    flag("nydus-overlayfs-path", help="accepted for upstream compatibility; not used here (warns)")
    flag("metrics-address", help="overrides [metrics] address (host:port)")
    return p


def load_config(args: argparse.Namespace) -> cfgmod.Config:
    cfg = cfgmod.load(args.config) if args.config else cfgmod.Config()
    warnings = list(cfg.warnings)
    if args.root:
        cfg = cfg.replace(root=os.path.abspath(args.root))
    if args.address:
        cfg = cfg.replace(address=os.path.abspath(args.address))
    if args.log_level or args.log_format:
        cfg = cfg.replace(log=dataclasses.replace(cfg.log, level=args.log_level or cfg.log.level,
                                                  format=args.log_format or cfg.log.format))
    mode = cfgmod.UPSTREAM_DAEMON_MODES.get(args.daemon_mode, args.daemon_mode) if args.daemon_mode else None
    daemon = dataclasses.replace(cfg.daemon, fs_driver=args.fs_driver or cfg.daemon.fs_driver,
                                 daemon_mode=mode or cfg.daemon.daemon_mode,
                                 nydusd_config=args.nydusd_config or cfg.daemon.nydusd_config)
    if args.nydusd:
        if not os.path.isfile(args.nydusd) or not os.access(args.nydusd, os.X_OK):
            raise ConfigError(f"--nydusd {args.nydusd}: not an executable file; pass the path of nydusd "
                              "or omit the flag to use the bundled one")
        daemon = dataclasses.replace(daemon, nydusd_path=os.path.abspath(args.nydusd))
    cfg = cfg.replace(daemon=daemon)
    for name in ("nydus_image", "nydus_overlayfs_path"):
        if getattr(args, name):
            warnings.append(f"flag --{name.replace('_', '-')} is accepted but not supported here (ignored)")
    if args.metrics_address is not None:
        cfg = cfg.replace(metrics=dataclasses.replace(cfg.metrics, address=args.metrics_address))
    return cfgmod.validate(cfg.replace(warnings=tuple(warnings)))


def check_paths(cfg: cfgmod.Config) -> None:
    """The root and the socket's directory exist (created if missing) and are writable; else a
    :class:`ConfigError` with the cause and the fix."""
    for what, path, flag in (("root", cfg.root, "--root"),
                             ("socket directory", os.path.dirname(cfg.address), "--address")):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            probe = os.path.join(path, f".write-test.{os.getpid()}")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"{what} {path} is not a writable directory ({exc.strerror or exc}); "
                              f"pass {flag} with a writable directory, or fix its permissions") from None


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's ``$NOTIFY_SOCKET`` (``Type=notify`` units).
    Returns False when not started by systemd; a failure to send is logged, never fatal."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def run(cfg: cfgmod.Config, stop: threading.Event | None = None) -> int:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    from snapshotter.instances import check_fs_driver  # noqa: PLC0415 - keep `--help` fast
    from snapshotter.snapshot import Snapshotter  # noqa: PLC0415

    check_fs_driver(cfg)
    check_paths(cfg)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: (log.info("signal %d: shutting down", signum), stop.set()))
    sn = Snapshotter(cfg)
    try:
        sn.start()
    except SnapshotterError:
        log.exception("recovering RAFS instances failed; serving anyway")
    if cfg.daemon.daemon_mode == "shared":
        # as upstream: the shared nydusd starts with the snapshotter (in the background), so the
        # first nydus image's container does not wait for the daemon process to come up; before
        # the gRPC and metrics imports below, which then overlap the daemon's own start
        sn.rafs.prestart()
    from snapshotter.metrics import Metrics  # noqa: PLC0415
    from snapshotter.service import serve  # noqa: PLC0415

    metrics = Metrics(sn)
    group = cfgmod.socket_gid(cfg.socket_group) if cfg.socket_group else None
    server = serve(sn, cfg.address, observe=metrics.observe, group=group)
    from snapshotter.system import SystemController  # noqa: PLC0415

    system = SystemController(sn.rafs, cfg.system_address).start() if cfg.system.enable else None  # (hot upgrade)
    renewal_interval = cfg.remote.auth.renewal_seconds
    if renewal_interval > 0:
        sn.renewal.start(renewal_interval, stop)
        log.info("registry credentials of running instances renewed every %gs", renewal_interval)
    if cfg.metrics.address:
        host, port = metrics.serve(cfg.metrics.address)
        log.info("metrics on http://%s:%d/metrics", host, port)
    log.info("nydus-snapshotter serving on %s (root %s, fs_driver %s, daemon_mode %s)", cfg.address, cfg.root,
             cfg.daemon.fs_driver, cfg.daemon.daemon_mode)
    sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving on {cfg.address}")
    try:
        # short waits: a SIGTERM the kernel delivers to another thread (gRPC's, the daemon
        # starter's) only runs its Python handler once the main thread wakes up
        while not stop.wait(0.5):
            pass
    finally:
        sd_notify("STOPPING=1")
        server.stop(grace=5).wait(10)
        if system is not None:
            system.stop()
        metrics.shutdown()
        sn.close()
        try:
            os.unlink(cfg.address)
        except OSError:
            pass
        log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "nydus-snapshotter") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)          # exits 2 on usage errors
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.format, sys.stdout if args.log_to_stdout else None)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    try:
        return run(cfg)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except SnapshotterError as exc:
        log.error("fatal: %s", exc)
        return 1


def grpc_main(argv: Sequence[str] | None = None) -> int:
    """``containerd-nydus-grpc``: upstream's binary name and flags."""
    return main(argv, prog="containerd-nydus-grpc")


if __name__ == "__main__":
    sys.exit(main())
