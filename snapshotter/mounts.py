"""Pure mount computation (no IO): what Prepare/View/Mounts return for a snapshot.

``native_mounts`` is containerd's overlay snapshotter ``mounts()``: no parents → bind of the
snapshot's own ``fs`` (rw, or ro for a view); a view with one parent → ro bind of that parent;
otherwise overlay with ``lowerdir`` = parents nearest first, plus ``upperdir``/``workdir`` when
active. ``remote_mounts`` puts a RAFS mountpoint under the overlay instead of the layer dirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from snapshotter.metastore import Kind, Snapshot


@dataclass(frozen=True, slots=True)
class Mount:
    """One entry of containerd's ``repeated Mount``."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OverlayOptions:
    """Host-dependent overlay options (detected once at start)."""

    index_off: bool = False     # kernel overlay module has index=on by default → pass index=off
    userxattr: bool = False     # running in a user namespace → overlay needs "userxattr"
    volatile: bool = False      # add "volatile" to active snapshots


def snapshot_dir(root: str, sid: str) -> str:
    return os.path.join(root, "snapshots", sid)


def upper_path(root: str, sid: str) -> str:
    return os.path.join(root, "snapshots", sid, "fs")


def work_path(root: str, sid: str) -> str:
    return os.path.join(root, "snapshots", sid, "work")


def _base_options(opts: OverlayOptions) -> list[str]:
    out: list[str] = []
    if opts.index_off:
        out.append("index=off")
    if opts.userxattr:
        out.append("userxattr")
    return out


def native_mounts(root: str, snap: Snapshot, opts: OverlayOptions = OverlayOptions()) -> list[Mount]:
    """containerd overlayfs-snapshotter mounts for ``snap``."""
    if not snap.parent_ids:
        flag = "ro" if snap.kind == Kind.VIEW else "rw"
        return [Mount("bind", upper_path(root, snap.id), (flag, "rbind"))]
    options = _base_options(opts)
    if snap.kind == Kind.ACTIVE:
        if opts.volatile:
            options.append("volatile")
        options += [f"workdir={work_path(root, snap.id)}", f"upperdir={upper_path(root, snap.id)}"]
    elif len(snap.parent_ids) == 1:
        return [Mount("bind", upper_path(root, snap.parent_ids[0]), ("ro", "rbind"))]
    lower = ":".join(upper_path(root, pid) for pid in snap.parent_ids)
    options.append(f"lowerdir={lower}")
    return [Mount("overlay", "overlay", tuple(options))]


def remote_mounts(root: str, snap: Snapshot, rafs_mountpoint: str, *, between: tuple[str, ...] = (),
                  opts: OverlayOptions = OverlayOptions()) -> list[Mount]:
    """Mounts of a snapshot above a nydus meta layer whose RAFS is mounted at ``rafs_mountpoint``.

    ``between`` are ids of plain layers between the snapshot and the meta layer (nearest first);
    they go in front of the RAFS mountpoint in ``lowerdir``. An active snapshot gets its own
    upper/work dirs; a view is an ro overlay (or an ro bind when RAFS is the only lower layer).
    """
    lowers = [upper_path(root, pid) for pid in between] + [rafs_mountpoint]
    if snap.kind == Kind.VIEW and len(lowers) == 1:
        return [Mount("bind", rafs_mountpoint, ("ro", "rbind"))]
    options = _base_options(opts)
    if snap.kind == Kind.ACTIVE:
        if opts.volatile:
            options.append("volatile")
        options += [f"workdir={work_path(root, snap.id)}", f"upperdir={upper_path(root, snap.id)}"]
    else:
        # overlay needs at least two lower layers without an upper dir: add the view's own
        # (empty) fs dir on top, as upstream does.
        lowers = [upper_path(root, snap.id)] + lowers
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]
