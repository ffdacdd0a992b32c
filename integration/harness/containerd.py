"""A private containerd 1.6 (own root/state/socket/opt in a temp dir) with CRI and proxy plugins.

    with Containerd(snapshotters={"nydus": snap.address}, cri_snapshotter="nydus",
                    registries=[reg]) as ctd:
        ctd.cri.pull_image(ref)                    # CRI path: snapshotter gets cri.* labels
        ctd.ctr("-n", "k8s.io", "images", "ls")    # any ctr command (adds --address)
        out = ctd.run(ref, ["/bin/sh", "-c", "echo hi"], snapshotter="nydus",
                      namespace="k8s.io")          # ctr run --rm, returns CompletedProcess

Containers started through :meth:`run` get a cgroup path under a per-instance prefix, so stop()
can remove exactly the cgroup dirs this instance caused. stop() kills our tasks, stops containerd
and leftover shims (those whose command line names our socket) by PID, unmounts everything
under the temp dir and removes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import toml

from integration.harness import HarnessError
from integration.harness.util import (log_tail, pids_mentioning, with_pdeathsig, short_tempdir,
                                      stop_process, unmount_all, wait_until)

if TYPE_CHECKING:
    from integration.harness.registry import Registry
    from snapshotter.ctl import CriImageClient

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CRI_NAMESPACE = "k8s.io"
CGROUP_ROOT = "/sys/fs/cgroup"


def containerd_config(*, root: str, state: str, address: str, opt_dir: str, cni_conf_dir: str,
                      snapshotters: Mapping[str, str] = {}, cri_snapshotter: str = "overlayfs",
                      mirrors: Iterable[str] = (), registry_auth: Mapping[str, tuple[str, str]] = {},
                      debug_level: str = "info", enable_cri: bool = True) -> dict[str, Any]:
    """The containerd (config version 2) settings the harness uses, as a dict for ``toml``.

    ``snapshotters``: proxy plugin name -> unix socket; ``mirrors``: registry hosts reachable over
    plain HTTP (``127.0.0.1:PORT``); ``registry_auth``: host -> (user, password) for CRI pulls.
    """
    cfg: dict[str, Any] = {
        "version": 2,
        "root": root,
        "state": state,
        "grpc": {"address": address},
        "ttrpc": {"address": address + ".ttrpc"},
        "debug": {"level": debug_level},
        "plugins": {"io.containerd.internal.v1.opt": {"path": opt_dir}},
        "proxy_plugins": {name: {"type": "snapshot", "address": sock}
                          for name, sock in snapshotters.items()},
    }
    if not enable_cri:
        cfg["disabled_plugins"] = [CRI_PLUGIN]
        return cfg
    registry: dict[str, Any] = {
        "mirrors": {h: {"endpoint": [f"http://{h}"]} for h in mirrors},
    }
    if registry_auth:
        registry["configs"] = {h: {"auth": {"username": u, "password": p}}
                               for h, (u, p) in registry_auth.items()}
    cfg["plugins"][CRI_PLUGIN] = {
        "disable_tcp_service": True,
        "stream_server_address": "127.0.0.1",
        "stream_server_port": "0",
        "containerd": {
            "snapshotter": cri_snapshotter,
            # containerd 1.6 defaults to true: then no containerd.io/snapshot/cri.* labels reach
            # the snapshotter and a nydus snapshotter cannot find the image's bootstrap layer.
            "disable_snapshot_annotations": False,
        },
        "cni": {"bin_dir": "/usr/lib/cni", "conf_dir": cni_conf_dir},
        "registry": registry,
    }
    return cfg


def _deep_merge(base: dict, extra: Mapping) -> dict:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def cri_runtime_config(address: str) -> dict[str, Any]:
    """containerd's effective CRI config (``RuntimeService.Status(verbose)`` "config" JSON)."""
    import json

    import grpc

    from protos.cri import api_pb2, api_pb2_grpc

    with grpc.insecure_channel("unix://" + address) as ch:
        resp = api_pb2_grpc.RuntimeServiceStub(ch).Status(api_pb2.StatusRequest(verbose=True),
                                                          timeout=30)
    return json.loads(resp.info["config"])


class Containerd:
    """A private containerd process; use as a context manager (or start()/stop())."""

    def __init__(self, *, snapshotters: Mapping[str, str] | None = None,
                 cri_snapshotter: str = "overlayfs",
                 registries: Sequence["Registry"] = (), mirrors: Iterable[str] = (),
                 registry_auth: Mapping[str, tuple[str, str]] | None = None,
                 enable_cri: bool = True, debug_level: str = "info",
                 base_dir: str | None = None, start_timeout: float = 30.0,
                 env: Mapping[str, str] | None = None,
                 extra_config: Mapping[str, Any] | None = None) -> None:
        """``extra_config`` is deep-merged last into the generated config (any containerd key)."""
        self.snapshotters = dict(snapshotters or {})
        self.cri_snapshotter = cri_snapshotter
        self.mirrors = [r.host for r in registries] + list(mirrors)
        auth = dict(registry_auth or {})
        for r in registries:
            if r.auth is not None:
                auth.setdefault(r.host, r.auth)
        self.registry_auth = auth
        self.enable_cri = enable_cri
        self.debug_level = debug_level
        self._base_dir = base_dir
        self.start_timeout = start_timeout
        self.env = dict(env or {})
        self.extra_config = dict(extra_config or {})
        self.id = uuid.uuid4().hex[:8]
        self.namespace = f"pyn-{self.id}"          # unique containerd namespace for ctr use
        self.cgroup_prefix = f"pynydus-{self.id}"  # cgroup parent of containers run()
        self.dir = ""
        self.proc: subprocess.Popen | None = None
        self.config: dict[str, Any] = {}
        self._cri: "CriImageClient | None" = None
        self._namespaces_used: set[str] = {self.namespace}
        self._cgroup_dirs_before: set[str] = set()

    # -- paths -------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return os.path.join(self.dir, "root")

    @property
    def state(self) -> str:
        return os.path.join(self.dir, "state")

    @property
    def address(self) -> str:
        return os.path.join(self.dir, "state", "containerd.sock")

    @property
    def config_path(self) -> str:
        return os.path.join(self.dir, "config.toml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "containerd.log")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Containerd":
        for binary in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
            if shutil.which(binary) is None:
                raise HarnessError(f"{binary} not found (Debian packages containerd, runc)")
        # short path: unix socket paths must stay under 108 bytes
        self.dir = short_tempdir("pyn-ctd-", self._base_dir)
        for d in ("root", "state", "opt", "cni"):
            os.makedirs(os.path.join(self.dir, d))
        self._cgroup_dirs_before = set(self._ns_cgroup_dirs(CRI_NAMESPACE))
        self.config = containerd_config(
            root=self.root, state=self.state, address=self.address,
            opt_dir=os.path.join(self.dir, "opt"), cni_conf_dir=os.path.join(self.dir, "cni"),
            snapshotters=self.snapshotters, cri_snapshotter=self.cri_snapshotter,
            mirrors=self.mirrors, registry_auth=self.registry_auth,
            debug_level=self.debug_level, enable_cri=self.enable_cri)
        _deep_merge(self.config, self.extra_config)
        with open(self.config_path, "w") as f:
            toml.dump(self.config, f)
        env = dict(os.environ)
        env.update(self.env)
        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(with_pdeathsig(["containerd", "--config", self.config_path]),
                                             stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env,
                                             start_new_session=True)
            wait_until(self._ready, self.start_timeout, "containerd", self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if not os.path.exists(self.address):
            return False
        r = subprocess.run(["ctr", "--address", self.address, "version"], capture_output=True,
                           timeout=10)
        if r.returncode != 0:
            return False
        if self.enable_cri:
            return self.cri.list_images() is not None
        return True

    def __enter__(self) -> "Containerd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log(self) -> str:
        return log_tail(self.log_path, 200)

    def stop(self) -> None:
        """Kill tasks, stop containerd and our shims by PID, unmount, remove cgroup/temp dirs."""
        if self._cri is not None:
            self._cri.close()
            self._cri = None
        if self.proc is not None and self.proc.poll() is None:
            for ns in sorted(self._namespaces_used | {CRI_NAMESPACE}):
                try:
                    self._kill_tasks(ns)
                except HarnessError:
                    pass   # a hung ctr call: stopping containerd and the shims below still works
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
            self.proc = None
        if self.dir:
            for pid in self.shim_pids():
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            unmount_all(self.dir)
        self._remove_cgroup_dirs()
        if self.dir and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_tasks(self, ns: str) -> None:
        r = self.ctr("-n", ns, "tasks", "ls", "-q", check=False, timeout=20)
        for task in r.stdout.split():
            self.ctr("-n", ns, "tasks", "kill", "-s", "KILL", task, check=False, timeout=20)
        for task in r.stdout.split():
            self.ctr("-n", ns, "tasks", "rm", "-f", task, check=False, timeout=20)
        r = self.ctr("-n", ns, "containers", "ls", "-q", check=False, timeout=20)
        for c in r.stdout.split():
            self.ctr("-n", ns, "containers", "rm", c, check=False, timeout=20)

    def shim_pids(self) -> list[int]:
        """PIDs of containerd-shim-runc-v2 processes serving this containerd."""
        if not self.dir:
            return []
        return pids_mentioning("containerd-shim", self.address)

    @staticmethod
    def _ns_cgroup_dirs(name: str) -> list[str]:
        if not os.path.isdir(CGROUP_ROOT):
            return []
        out = []
        for ctrl in os.listdir(CGROUP_ROOT):
            d = os.path.join(CGROUP_ROOT, ctrl, name)
            if os.path.isdir(d):
                out.append(d)
        return out

    def cgroup_dirs(self) -> list[str]:
        """Cgroup dirs this instance is responsible for that still exist."""
        dirs = self._ns_cgroup_dirs(self.cgroup_prefix)
        for ns in self._namespaces_used:
            if ns != CRI_NAMESPACE:
                dirs += self._ns_cgroup_dirs(ns)
        dirs += [d for d in self._ns_cgroup_dirs(CRI_NAMESPACE) if d not in self._cgroup_dirs_before]
        return dirs

    def _remove_cgroup_dirs(self) -> None:
        # runc (cgroupfs driver) leaves empty parent dirs; rmdir fails (safely) on non-empty
        # ones. Below our own prefix/namespace every dir is ours; of a shared "k8s.io" dir only
        # the (empty) top is removed, never other containerds' container dirs inside it.
        shared = set(self._ns_cgroup_dirs(CRI_NAMESPACE))
        for d in self.cgroup_dirs():
            subs = [d] if d in shared else [p for p, _, _ in os.walk(d, topdown=False)]
            for sub in subs:
                try:
                    os.rmdir(sub)
                except OSError:
                    pass

    # -- clients -----------------------------------------------------------------------------
    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``ctr --address <ours> ARGS``; text output; raise HarnessError if check fails."""
        argv = ["ctr", "--address", self.address, *args]
        try:
            r = subprocess.run(argv, capture_output=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"{' '.join(argv)}: timed out after {timeout}s") from e
        res = subprocess.CompletedProcess(argv, r.returncode, r.stdout.decode(errors="replace"),
                                          r.stderr.decode(errors="replace"))
        if check and r.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} -> rc={r.returncode}\nstdout: {res.stdout}\n"
                               f"stderr: {res.stderr}")
        return res

    @property
    def cri(self) -> "CriImageClient":
        """CRI ImageService client on our socket (pull_image, remove_image, image_status...)."""
        if not self.enable_cri:
            raise HarnessError("this Containerd was started with enable_cri=False")
        if self._cri is None:
            from snapshotter.ctl import CriImageClient

            self._cri = CriImageClient(self.address, timeout=120)
        return self._cri

    def pull(self, ref: str, *, snapshotter: str | None = None, namespace: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
        """``ctr image pull --plain-http`` (the unpack path that passes no labels)."""
        ns = self.use_namespace(namespace)
        args = ["-n", ns, "image", "pull", "--plain-http"]
        if snapshotter:
            args += ["--snapshotter", snapshotter]
        for host, (user, pw) in self.registry_auth.items():
            if ref.startswith(host + "/"):
                args += ["--user", f"{user}:{pw}"]
        return self.ctr(*args, ref, timeout=timeout)

    def use_namespace(self, namespace: str | None) -> str:
        ns = namespace or self.namespace
        self._namespaces_used.add(ns)
        return ns

    def run(self, ref: str, cmd: Sequence[str] = (), *, snapshotter: str | None = None,
            namespace: str | None = None, container_id: str | None = None,
            extra_args: Sequence[str] = (), check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """``ctr run --rm`` of an image already pulled/unpacked for ``snapshotter``."""
        argv = self.run_argv(ref, cmd, snapshotter=snapshotter, namespace=namespace,
                             container_id=container_id, extra_args=extra_args)
        return self.ctr(*argv[3:], check=check, timeout=timeout)

    def run_argv(self, ref: str, cmd: Sequence[str] = (), *, snapshotter: str | None = None,
                 namespace: str | None = None, container_id: str | None = None,
                 extra_args: Sequence[str] = ()) -> list[str]:
        """The full ``ctr ... run --rm`` argv :meth:`run` uses (to stream its output yourself)."""
        ns = self.use_namespace(namespace)
        cid = container_id or f"c-{uuid.uuid4().hex[:10]}"
        args = ["ctr", "--address", self.address, "-n", ns, "run", "--rm",
                "--cgroup", f"/{self.cgroup_prefix}/{cid}"]
        if snapshotter:
            args += ["--snapshotter", snapshotter]
        return [*args, *extra_args, ref, cid, *cmd]

    def wait_snapshotter(self, name: str, timeout: float = 15.0) -> None:
        """Wait until containerd can talk to proxy snapshotter ``name`` (it redials with
        backoff up to a few seconds after the snapshotter restarts)."""
        # List/Stat may be answered from containerd's own metadata; Prepare reaches the backend.
        def ok() -> bool:
            key = f"pyn-ready-{uuid.uuid4().hex[:8]}"
            r = self.ctr("-n", self.namespace, "snapshots", "--snapshotter", name, "prepare",
                         key, check=False, timeout=10)
            if r.returncode == 0:
                self.ctr("-n", self.namespace, "snapshots", "--snapshotter", name, "rm", key,
                         check=False, timeout=10)
            return r.returncode == 0
        wait_until(ok, timeout, f"containerd -> snapshotter {name!r}")

    def view_mounts(self, key: str, parent: str, *, snapshotter: str,
                    namespace: str = CRI_NAMESPACE) -> list[dict[str, Any]]:
        """``ctr snapshots view --mounts``: a read-only view of committed ``parent``; returns
        containerd's mount list (``type``, ``source``, ``options``)."""
        import json

        self.use_namespace(namespace)
        r = self.ctr("-n", namespace, "snapshots", "--snapshotter", snapshotter, "view",
                     "--mounts", key, parent)
        return list(json.loads(r.stdout) or [])


def mount_all(mounts: Sequence[Mapping[str, Any]], target: str) -> None:
    """Mount a containerd mount list on ``target`` (as the shim would); undo with umount."""
    for m in mounts:
        # ctr prints Go field names ("Type", "Source", "Options")
        mtype = m.get("type", m.get("Type", ""))
        source = m.get("source", m.get("Source", ""))
        opts = list(m.get("options", m.get("Options")) or [])
        if mtype == "bind" or "bind" in opts or "rbind" in opts:
            flag = "--rbind" if "rbind" in opts else "--bind"
            subprocess.run(["mount", flag, source, target], check=True, capture_output=True)
            if "ro" in opts:
                subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True,
                               capture_output=True)
        else:
            argv = ["mount", "-t", mtype]
            if opts:
                argv += ["-o", ",".join(opts)]
            r = subprocess.run(argv + [source, target], capture_output=True, text=True)
            if r.returncode != 0:
                raise HarnessError(f"{' '.join(argv)} {source} {target}: {r.stderr.strip()}")
