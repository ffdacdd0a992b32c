"""``nydus-snapshotter``: the containerd proxy snapshotter service.

    nydus-snapshotter [--config FILE] [--root DIR] [--address SOCKET] [--log-level L] [--log-format F]
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
import sys
import threading
import time
from typing import Sequence

from snapshotter import config as cfgmod
from snapshotter.errors import ConfigError, SnapshotterError

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


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level.lower()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydus-snapshotter", description="containerd snapshotter for nydus images")
    p.add_argument("--config", help="TOML config file (version = 1)")
    p.add_argument("--root", help="state directory (overrides `root`)")
    p.add_argument("--address", help="gRPC unix socket (overrides `address`)")
    p.add_argument("--log-level", choices=sorted(_LEVELS), help="overrides [log] level")
    p.add_argument("--log-format", choices=cfgmod.LOG_FORMATS, help="overrides [log] format")
    p.add_argument("--fs-driver", choices=cfgmod.FS_DRIVERS, help="overrides [daemon] fs_driver")
    p.add_argument("--daemon-mode", choices=cfgmod.DAEMON_MODES, help="overrides [daemon] daemon_mode")
    p.add_argument("--metrics-address", help="overrides [metrics] address (host:port)")
    return p


def load_config(args: argparse.Namespace) -> cfgmod.Config:
    cfg = cfgmod.load(args.config) if args.config else cfgmod.Config()
    if args.root:
        cfg = cfg.replace(root=os.path.abspath(args.root))
    if args.address:
        cfg = cfg.replace(address=os.path.abspath(args.address))
    if args.log_level or args.log_format:
        cfg = cfg.replace(log=dataclasses.replace(cfg.log, level=args.log_level or cfg.log.level,
                                                  format=args.log_format or cfg.log.format))
    if args.fs_driver or args.daemon_mode:
        cfg = cfg.replace(daemon=dataclasses.replace(cfg.daemon, fs_driver=args.fs_driver or cfg.daemon.fs_driver,
                                                     daemon_mode=args.daemon_mode or cfg.daemon.daemon_mode))
    if args.metrics_address is not None:
        cfg = cfg.replace(metrics=dataclasses.replace(cfg.metrics, address=args.metrics_address))
    return cfgmod.validate(cfg)


def run(cfg: cfgmod.Config, stop: threading.Event | None = None) -> int:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    from snapshotter.metrics import Metrics  # noqa: PLC0415 - keep `--help` fast
    from snapshotter.service import serve  # noqa: PLC0415
    from snapshotter.instances import check_fs_driver  # noqa: PLC0415
    from snapshotter.snapshot import Snapshotter  # noqa: PLC0415

    check_fs_driver(cfg)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: (log.info("signal %d: shutting down", signum), stop.set()))
    sn = Snapshotter(cfg)
    metrics = Metrics(sn)
    try:
        sn.start()
    except SnapshotterError:
        log.exception("recovering RAFS instances failed; serving anyway")
    group = cfgmod.socket_gid(cfg.socket_group) if cfg.socket_group else None
    server = serve(sn, cfg.address, observe=metrics.observe, group=group)
    if cfg.metrics.address:
        host, port = metrics.serve(cfg.metrics.address)
        log.info("metrics on http://%s:%d/metrics", host, port)
    log.info("nydus-snapshotter serving on %s (root %s, fs_driver %s, daemon_mode %s)", cfg.address, cfg.root,
             cfg.daemon.fs_driver, cfg.daemon.daemon_mode)
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.stop(grace=5).wait(10)
        metrics.shutdown()
        sn.close()
        try:
            os.unlink(cfg.address)
        except OSError:
            pass
        log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"nydus-snapshotter: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.format)
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


if __name__ == "__main__":
    sys.exit(main())
