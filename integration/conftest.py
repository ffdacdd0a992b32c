"""pytest fixtures for real-stack tests (library in integration/harness/, docs in
docs/operators.md). Every fixture stops what it started (by PID) and removes its temp dirs,
also when the test fails.

* ``registry``            started :class:`Registry` (plain HTTP, no auth, free port).
* ``registry_factory``    ``registry_factory(users={"u": "p"}, extra_config={...},
                          config_hook=fn)`` -> started Registry; any number per test.
* ``busybox_image``       :class:`PushedImage` of busybox-static + ``/etc/hello.txt``
                          ("hello from pynydus\\n") in ``registry`` as ``test/busybox:v1``.
* ``containerd_factory``  ``containerd_factory(snapshotters={"nydus": sock},
                          cri_snapshotter="nydus", registries=[reg], ...)`` -> started Containerd.
* ``containerd``          Containerd with CRI on the stock overlayfs snapshotter, mirror for
                          ``registry``.
* ``snapshotter_factory`` ``snapshotter_factory(config={...})`` -> started
                          :class:`SnapshotterProcess`.
* ``nydus_snapshotter``   our snapshotter; config: plain HTTP to ``registry``
                          (``snapshotter_config_for(*registries)`` builds that config).
* ``nydus_containerd``    Containerd with proxy plugin ``nydus`` -> ``nydus_snapshotter``, CRI
                          snapshotter ``nydus``, mirror for ``registry``.
* ``lazy_containerd``     the same with background prefetch off (exact on-demand byte counts);
                          its snapshotter is ``lazy_containerd.snapshotter``.
* ``wheels``              directory with the wheels ``misc/install.sh install`` installs from;
                          built once per session (integration/install_support.py).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any, Callable, Iterator

import pytest

from integration.harness.containerd import Containerd
from integration.harness.images import PushedImage, busybox_image as _busybox_image
from integration.harness.registry import Registry
from integration.harness.snapshotter import SnapshotterProcess
from integration.install_support import build_wheels

HELLO = b"hello from pynydus\n"


def _need(binary: str, package: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed (Debian package {package})")


def need_containerd_stack() -> None:
    """Skip unless root with containerd, runc and docker-registry installed."""
    if os.geteuid() != 0:
        pytest.skip("containerd tests need root")
    _need("containerd", "containerd")
    _need("ctr", "containerd")
    _need("runc", "runc")
    _need("docker-registry", "docker-registry")
    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox missing (Debian package busybox-static)")


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The wheels of ``misc/install.sh build`` (shared by the install tests: built once)."""
    return build_wheels(tmp_path_factory.mktemp("wheels"))


@pytest.fixture
def registry_factory() -> Iterator[Callable[..., Registry]]:
    _need("docker-registry", "docker-registry")
    started: list[Registry] = []

    def make(**kw: Any) -> Registry:
        reg = Registry(**kw)
        started.append(reg)
        return reg.start()

    try:
        yield make
    finally:
        for reg in reversed(started):
            reg.stop()


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    return registry_factory()


@pytest.fixture
def busybox_image(registry: Registry) -> PushedImage:
    if not os.path.exists("/bin/busybox"):
        pytest.skip("/bin/busybox missing (Debian package busybox-static)")
    return _busybox_image({"etc/hello.txt": HELLO}).push(registry, "test/busybox", "v1")


@pytest.fixture
def containerd_factory() -> Iterator[Callable[..., Containerd]]:
    need_containerd_stack()
    started: list[Containerd] = []

    def make(**kw: Any) -> Containerd:
        ctd = Containerd(**kw)
        started.append(ctd)
        return ctd.start()

    try:
        yield make
    finally:
        for ctd in reversed(started):
            ctd.stop()


@pytest.fixture
def containerd(registry: Registry, containerd_factory: Callable[..., Containerd]) -> Containerd:
    return containerd_factory(registries=[registry])


@pytest.fixture
def snapshotter_factory() -> Iterator[Callable[..., SnapshotterProcess]]:
    started: list[SnapshotterProcess] = []

    def make(**kw: Any) -> SnapshotterProcess:
        snap = SnapshotterProcess(**kw)
        started.append(snap)
        return snap.start()

    try:
        yield make
    finally:
        for snap in reversed(started):
            snap.stop()


def snapshotter_config_for(*registries: Registry, prefetch: bool | None = None) -> dict[str, Any]:
    """Snapshotter config (TOML as a dict) that reaches these local registries over plain HTTP.

    ``prefetch=False`` turns background prefetch off, so only data that is read gets fetched
    (for exact byte counts); None keeps the snapshotter's default."""
    cfg: dict[str, Any] = {"version": 1,
                           "remote": {"insecure_registries": [r.host for r in registries]}}
    if prefetch is not None:
        cfg["prefetch"] = {"enable": prefetch}
    return cfg


@pytest.fixture
def lazy_containerd(registry: Registry, snapshotter_factory: Callable[..., SnapshotterProcess],
                    containerd_factory: Callable[..., Containerd]) -> Containerd:
    """Like ``nydus_containerd`` but background prefetch off: registry bytes = bytes read.
    The snapshotter is ``lazy_containerd.snapshotter``."""
    snap = snapshotter_factory(config=snapshotter_config_for(registry, prefetch=False))
    ctd = containerd_factory(snapshotters={"nydus": snap.address}, cri_snapshotter="nydus",
                             registries=[registry])
    ctd.snapshotter = snap  # type: ignore[attr-defined]
    return ctd


@pytest.fixture
def nydus_snapshotter(registry: Registry,
                      snapshotter_factory: Callable[..., SnapshotterProcess]) -> SnapshotterProcess:
    return snapshotter_factory(config=snapshotter_config_for(registry))


@pytest.fixture
def nydus_containerd(registry: Registry, nydus_snapshotter: SnapshotterProcess,
                     containerd_factory: Callable[..., Containerd]) -> Containerd:
    # argument order = setup order: containerd is stopped before the snapshotter and registry
    return containerd_factory(snapshotters={"nydus": nydus_snapshotter.address},
                              cri_snapshotter="nydus", registries=[registry])
