"""The Snapshotter: containerd overlayfs semantics plus nydus (RAFS) layers.

One call, one transaction (``metastore``). Directories are made as ``snapshots/new-*`` temp dirs
and renamed to ``snapshots/<id>`` inside the transaction; removed directories are deleted only
after the transaction committed. RAFS instances (one per image bootstrap, shared by every
container of that image) are started through :class:`snapshotter.instances.Instances` outside the
transaction, and stopped when the last active/view snapshot above them goes. The registry
settings of an image come from :mod:`snapshotter.remote`, bootstrap checks from
:mod:`snapshotter.bootstrap`, cache usage and GC from storage's file cache.

Nydus flow (labels in :mod:`snapshotter.labels`):

* extract Prepare with ``snapshot.ref`` + ``nydus-blob=true`` → commit an (empty) remote
  snapshot under the ref name, keeping the labels, and answer ALREADY_EXISTS;
* extract Prepare with ``nydus-bootstrap=true`` → native mounts; containerd unpacks the layer and
  the bootstrap lands in ``fs/image/image.boot`` (legacy ``fs/image.boot``), checked on Commit;
* Prepare/View above a meta layer → mount its RAFS instance, return overlay with
  ``lowerdir=<RAFS mountpoint>``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from typing import Any, Callable, Iterable, Mapping

from snapshotter import labels as L
from snapshotter.pull_credentials import CredentialStore
from snapshotter import metastore as store
from snapshotter.bootstrap import BOOTSTRAP_PATHS, bootstrap_blob_ids, check_bootstrap, find_bootstrap
from snapshotter.config import Config
from snapshotter.errors import (AlreadyExists, BootstrapError, FailedPrecondition, InvalidArgument, NotFound,
                                SnapshotterError)
from snapshotter.filters import compile_filters
from snapshotter.instances import InstanceManager, Instances
from snapshotter.metastore import Info, Kind, MetaStore, Snapshot, Usage
from snapshotter.mounts import Mount, OverlayOptions, native_mounts, remote_mounts, snapshot_dir, upper_path
from snapshotter.remote import Ping, ReachabilityProbe, backend_config_probing
from snapshotter.renewal import CredentialRenewal
from storage.cache.filecache import blob_usage, cache_dir_usage, gc_cache_dir

log = logging.getLogger("snapshotter")

MAX_LABEL_SIZE = 4096


# ----------------------------------------------------------------------------- validation


def validate_key(key: str, what: str = "key") -> None:
    """Keys are opaque names, but never empty, NUL-containing or with ``..`` components.

    Absolute keys are allowed: containerd's own conformance suite uses them (keys never become
    paths here — directories are named by sequence id).
    """
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    if "\0" in key:
        raise InvalidArgument(f"snapshot {what} {key!r} contains a NUL byte")
    if ".." in key.split("/"):
        raise InvalidArgument(f"snapshot {what} {key!r} contains a '..' path component")
    if len(key.encode()) > 4096:
        raise InvalidArgument(f"snapshot {what} is longer than 4096 bytes")


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's label limits plus sane values for the nydus labels we act on."""
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {k[:64]}")
        if "\0" in k or "\0" in v:
            raise InvalidArgument(f"label {k[:64]!r} contains a NUL byte")
    for flag in (L.NYDUS_DATA_LAYER, L.NYDUS_META_LAYER):
        if flag in labels and labels[flag].strip().lower() not in ("true", "false", "1", "0", "yes", "no", ""):
            raise InvalidArgument(f"label {flag}={labels[flag]!r}: expected true or false")
    if L.is_nydus_data_layer(labels) and L.is_nydus_meta_layer(labels):
        raise InvalidArgument(f"labels {L.NYDUS_DATA_LAYER} and {L.NYDUS_META_LAYER} are exclusive")
    if L.is_nydus_data_layer(labels):
        L.layer_blob_id(labels)  # raises on a malformed digest
    if L.CRI_IMAGE_REF in labels:
        L.parse_image_ref(labels[L.CRI_IMAGE_REF])
    L.label_credentials(labels)


def disk_usage(path: str) -> Usage:
    """containerd's ``fs.DiskUsage``: allocated bytes and inodes, hard links counted once."""
    size = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            if name == "" and dirpath != path:
                continue
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            inodes += 1
            size += st.st_blocks * 512
    return Usage(size=size, inodes=inodes)


def _host_overlay_options(volatile: bool) -> OverlayOptions:
    index_off = False
    try:
        with open("/sys/module/overlay/parameters/index") as f:
            index_off = f.read().strip() == "Y"
    except OSError:
        pass
    userxattr = False
    try:
        with open("/proc/self/uid_map") as f:
            userxattr = f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        pass
    return OverlayOptions(index_off=index_off, userxattr=userxattr, volatile=volatile)




# ----------------------------------------------------------------------------- the snapshotter


class Snapshotter:
    """containerd snapshotter semantics over :mod:`snapshotter.metastore` plus RAFS instances."""

    def __init__(self, config: Config, *, manager: InstanceManager | None = None,
                 manager_factory: Callable[[Config], InstanceManager] | None = None,
                 ping: Ping | None = None) -> None:
        self.config = config
        self.root = os.path.abspath(config.root)
        os.makedirs(os.path.join(self.root, "snapshots"), mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.ms = MetaStore(os.path.join(self.root, "metadata.db"))
        self.credentials = CredentialStore(self.root)
        self.overlay = _host_overlay_options(config.snapshot.enable_overlayfs_volatile)
        self.rafs = Instances(config, self._needed_instances, manager=manager, manager_factory=manager_factory)
        self._ping = ping
        self.renewal = CredentialRenewal(self)
        self.gc_deleted = 0  #: cache blobs deleted by gc_cache (metrics)
        self.gc_errors = 0   #: gc_cache passes that failed
        self.referrers = None
        if config.experimental.enable_referrer_detect:
            from snapshotter.referrer import ReferrerDetector

            self.referrers = ReferrerDetector(config)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Recover RAFS instances left by a previous run (running containers keep their mounts)."""
        self.rafs.recover()

    def close(self) -> None:
        """Stop serving; RAFS instances stay mounted unless ``cleanup_on_close``."""
        if self.config.cleanup_on_close:
            self.rafs.close()
        self.ms.close()

    # -- containerd calls -----------------------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = dict(labels or {})
        self._validate(key, parent, labels)
        target = L.target_ref(labels)
        if target is not None and L.is_nydus_data_layer(labels):
            self._commit_remote_layer(key, parent, target, labels)
        if (target is not None and self.referrers is not None and not L.is_nydus_meta_layer(labels)
                and L.CRI_IMAGE_REF in labels):
            try:
                layer = self.referrers.bootstrap_layer(labels)
            except SnapshotterError as exc:  # the plain OCI image still works
                log.warning("referrer detection failed, pulling %s normally: %s", key, exc)
                layer = None
            if layer is not None:
                self._commit_referrer_layer(key, parent, target, labels, layer)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = dict(labels or {})
        self._validate(key, parent, labels)
        return self._create(Kind.VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[Mount]:
        validate_key(key)
        with self.ms.transaction(writable=False) as tx:
            try:
                snap, chain = store.get_snapshot_chain(tx, key)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to get active mount: {exc}") from exc
        info = chain[0][1]
        meta = self._find_meta(chain[1:])
        if meta is None:
            return native_mounts(self.root, snap, self.overlay)
        meta_id, meta_info, between = meta
        mp = self._instance(meta_id, meta_info, info.labels)
        return remote_mounts(self.root, snap, mp, between=between, opts=self.overlay)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        labels = dict(labels or {})
        validate_key(name, "name")
        validate_key(key)
        validate_labels(labels)
        self.credentials.remember(labels)
        with self.ms.transaction(writable=True) as tx:
            sid, info, _ = store.get_info(tx, key)
            fs_dir = upper_path(self.root, sid)
            if info.kind == Kind.ACTIVE and (L.is_nydus_meta_layer(labels) or L.is_nydus_meta_layer(info.labels)):
                boot = find_bootstrap(fs_dir)
                if boot is None:
                    raise BootstrapError(
                        f"nydus bootstrap layer {key}: no {' or '.join(BOOTSTRAP_PATHS)} in the unpacked layer")
                check_bootstrap(boot)
            usage = disk_usage(fs_dir) if info.kind == Kind.ACTIVE else Usage()
            try:
                store.commit_active(tx, key, name, usage, labels)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to commit snapshot {key}: {exc}") from exc

    def remove(self, key: str) -> None:
        validate_key(key)
        with self.ms.transaction(writable=True) as tx:
            try:
                sid, _kind = store.remove(tx, key)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to remove: {exc}") from exc
        # after commit: the metadata already says it is gone; failures are only logged
        self.rafs.release_unneeded()
        if self.config.snapshot.sync_remove:
            self._remove_dir(sid)

    def stat(self, key: str) -> Info:
        validate_key(key)
        with self.ms.transaction(writable=False) as tx:
            return store.get_info(tx, key)[1]

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        validate_key(info.name)
        validate_labels(info.labels)
        with self.ms.transaction(writable=True) as tx:
            return store.update_info(tx, info, list(fieldpaths))

    def usage(self, key: str) -> Usage:
        validate_key(key)
        with self.ms.transaction(writable=False) as tx:
            sid, info, usage = store.get_info(tx, key)
            if info.kind == Kind.ACTIVE:
                return disk_usage(upper_path(self.root, sid))
        if info.kind == Kind.COMMITTED and L.is_nydus_data_layer(info.labels):
            blob_id = L.layer_blob_id(info.labels)
            if blob_id:
                size, files = blob_usage(self.config.cache_dir, blob_id)
                return Usage(size=size, inodes=files)
        return usage

    def walk(self, filters: Iterable[str] = ()) -> list[Info]:
        match = compile_filters(list(filters))
        with self.ms.transaction(writable=False) as tx:
            return store.walk_info(tx, match)

    def cleanup(self) -> list[str]:
        """Delete directories no snapshot owns, stop unneeded RAFS instances, GC the blob cache.

        Returns the removed directories.
        """
        self.rafs.release_unneeded()
        removed: list[str] = []
        snapdir = os.path.join(self.root, "snapshots")
        with self.ms.transaction(writable=True) as tx:  # writers hold the lock: no temp dir in flight
            ids = store.id_map(tx)
            stale = [d for d in os.listdir(snapdir) if d not in ids]
        for d in stale:
            if d in self.rafs:
                self.rafs.umount(d, only_if_unneeded=False)
            if self._remove_dir(d):
                removed.append(os.path.join(snapdir, d))
        if self.config.cache_manager.gc_on_cleanup and not self.config.cache_manager.disable:
            self.gc_cache()
        return removed

    # -- nydus helpers --------------------------------------------------------------------

    def _validate(self, key: str, parent: str, labels: Mapping[str, str]) -> None:
        validate_key(key)
        if parent:
            validate_key(parent, "parent")
        validate_labels(labels)
        self.credentials.remember(labels)

    def _commit_remote_layer(self, key: str, parent: str, target: str, labels: dict[str, str]) -> None:
        """Record a committed snapshot ``target`` for a lazily-loaded nydus data layer, then
        answer ALREADY_EXISTS so containerd adopts it and never downloads the blob."""
        validate_key(target, "target")
        labels = {**labels, L.REMOTE: "remote snapshot"}
        with self.ms.transaction(writable=True) as tx:
            try:
                _, existing, _ = store.get_info(tx, target)
            except NotFound:
                existing = None
            if existing is None:
                snap = self._create_in_tx(tx, Kind.ACTIVE, key, parent, labels)
                store.commit_active(tx, key, target, Usage(), labels)
                log.info("nydus data layer %s committed as remote snapshot %s (id %s)", key, target, snap.id)
                self.rafs.prestart()
            elif existing.kind != Kind.COMMITTED or existing.parent != parent:
                raise AlreadyExists(f'target snapshot "{target}" exists with parent "{existing.parent}"')
        raise AlreadyExists(f'target snapshot "{target}"')

    def _commit_referrer_layer(self, key: str, parent: str, target: str, labels: dict[str, str],
                               layer: bytes) -> None:
        """Referrer detection: commit ``target`` as a nydus meta layer holding the attached nydus
        image's bootstrap (every layer of the image gets it; the topmost one is mounted), then
        answer ALREADY_EXISTS so containerd downloads no OCI layer."""
        from snapshotter.referrer import unpack_bootstrap_layer

        validate_key(target, "target")
        labels = {**labels, L.REMOTE: "remote snapshot", L.NYDUS_META_LAYER: "true"}
        with self.ms.transaction(writable=True) as tx:
            try:
                _, existing, _ = store.get_info(tx, target)
            except NotFound:
                existing = None
            if existing is None:
                snap = self._create_in_tx(tx, Kind.ACTIVE, key, parent, labels)
                fs_dir = upper_path(self.root, snap.id)
                try:
                    unpack_bootstrap_layer(layer, fs_dir)
                    boot = find_bootstrap(fs_dir)
                    if boot is None:
                        raise FailedPrecondition("referrer bootstrap layer has no image/image.boot")
                    check_bootstrap(boot)
                except (BootstrapError, OSError, tarfile.TarError, EOFError) as exc:
                    raise FailedPrecondition(f"referrer bootstrap layer for {target}: {exc}") from exc
                store.commit_active(tx, key, target, Usage(), labels)
                log.info("layer %s served by its nydus referrer: committed as %s (id %s)", key, target, snap.id)
                self.rafs.prestart()
            elif existing.kind != Kind.COMMITTED or existing.parent != parent:
                raise AlreadyExists(f'target snapshot "{target}" exists with parent "{existing.parent}"')
        raise AlreadyExists(f'target snapshot "{target}"')

    def _create_in_tx(self, tx: store.Transaction, kind: Kind, key: str, parent: str,
                      labels: Mapping[str, str]) -> Snapshot:
        snapdir = os.path.join(self.root, "snapshots")
        td = tempfile.mkdtemp(prefix="new-", dir=snapdir)
        path = ""
        try:
            os.mkdir(os.path.join(td, "fs"), 0o755)
            os.chmod(os.path.join(td, "fs"), 0o755)
            if kind == Kind.ACTIVE:
                os.mkdir(os.path.join(td, "work"), 0o711)
            snap = store.create_snapshot(tx, kind, key, parent, labels)
            if snap.parent_ids:
                st = os.stat(upper_path(self.root, snap.parent_ids[0]))
                os.lchown(os.path.join(td, "fs"), st.st_uid, st.st_gid)
            path = snapshot_dir(self.root, snap.id)
            os.rename(td, path)
            td = ""
            return snap
        except BaseException:
            for d in (td, path):
                if d:
                    shutil.rmtree(d, ignore_errors=True)
            raise

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        target = L.target_ref(labels)
        with self.ms.transaction(writable=True) as tx:
            meta = None
            if parent and target is None:
                meta = self._meta_of_checked(tx, parent)
                if kind == Kind.VIEW and meta is None and self._is_data_layer(tx, parent):
                    raise FailedPrecondition(
                        f"cannot view nydus data layer {parent}: only the topmost (bootstrap) layer can be viewed")
            try:
                snap = self._create_in_tx(tx, kind, key, parent, labels)
            except SnapshotterError as exc:
                raise type(exc)(f"failed to create snapshot: {exc}") from exc
        if meta is None:
            return native_mounts(self.root, snap, self.overlay)
        meta_id, meta_info, between = meta
        try:
            mp = self._instance(meta_id, meta_info, labels)
        except BaseException:
            # undo: the caller sees an error, so the snapshot must not exist
            try:
                with self.ms.transaction(writable=True) as tx:
                    store.remove(tx, key)
                self._remove_dir(snap.id)
            except SnapshotterError:
                log.exception("failed to undo snapshot %s after a mount failure", key)
            raise
        return remote_mounts(self.root, snap, mp, between=between, opts=self.overlay)

    @staticmethod
    def _is_data_layer(tx: store.Transaction, key: str) -> bool:
        try:
            return L.is_nydus_data_layer(store.get_info(tx, key)[1].labels)
        except NotFound:
            return False

    def _meta_of_checked(self, tx: store.Transaction, parent: str) -> tuple[str, Info, tuple[str, ...]] | None:
        try:
            return self._meta_of(tx, parent)
        except NotFound:
            return None  # create_snapshot reports the missing parent with containerd's words

    def _meta_of(self, tx: store.Transaction, parent: str) -> tuple[str, Info, tuple[str, ...]] | None:
        """The nearest nydus meta layer in ``parent``'s chain: ``(id, info, plain ids above it)``."""
        return self._find_meta(store.parent_chain(tx, parent))

    @staticmethod
    def _find_meta(chain: list[tuple[str, Info]]) -> tuple[str, Info, tuple[str, ...]] | None:
        between: list[str] = []
        for sid, info in chain:
            if L.is_nydus_meta_layer(info.labels):
                return sid, info, tuple(between)
            if L.is_nydus_data_layer(info.labels):
                return None  # data layers without a bootstrap above them: nothing to mount
            between.append(sid)
        return None

    def _instance(self, meta_id: str, meta_info: Info, labels: Mapping[str, str]) -> str:
        """Mount (or reuse) the RAFS instance of meta snapshot ``meta_id``; returns its mountpoint."""

        def prepare() -> tuple[str, dict[str, Any], str, ReachabilityProbe | None]:
            boot = find_bootstrap(upper_path(self.root, meta_id))
            if boot is None:
                raise FailedPrecondition(f"nydus meta layer {meta_info.name} has no bootstrap file")
            try:
                check_bootstrap(boot)  # it may have been damaged since Commit
            except BootstrapError as exc:
                raise FailedPrecondition(f"nydus meta layer {meta_info.name}: {exc}") from exc
            merged = {**meta_info.labels,
                      **{k: v for k, v in labels.items() if k in (L.PULL_USERNAME, L.PULL_SECRET, L.CRI_IMAGE_REF)}}
            ref = L.image_ref(merged)
            if ref is None:
                raise FailedPrecondition(
                    f"failed to find image ref of snapshot {meta_info.name}: label {L.CRI_IMAGE_REF} missing")
            if L.PULL_SECRET not in merged:  # credentials of the pull, kept out of the metastore
                merged.update(self.credentials.labels_for(ref))
            backend, probe = backend_config_probing(ref, merged, self.config, self._ping)
            return boot, backend, ref, probe

        return self.rafs.ensure(meta_id, meta_info.name, prepare)

    def _needed_instances(self) -> set[str]:
        """Meta snapshot ids that some active/view snapshot sits on."""
        with self.ms.transaction(writable=False) as tx:
            snaps = store.snapshots_by_id(tx)
        by_key = {info.name: (sid, info) for sid, (info, _) in snaps.items()}
        needed: set[str] = set()
        for sid, (info, _) in snaps.items():
            if info.kind == Kind.COMMITTED:
                continue
            parent = info.parent
            while parent and parent in by_key:
                pid, pinfo = by_key[parent]
                if L.is_nydus_meta_layer(pinfo.labels):
                    needed.add(pid)
                    break
                parent = pinfo.parent
        return needed

    def instances(self) -> dict[str, str]:
        """Mounted RAFS instances: meta snapshot id → mountpoint."""
        return self.rafs.mounted()

    def instance_refs(self) -> dict[str, str]:
        """Mounted RAFS instances: meta snapshot id → the image reference in its labels."""
        mounted = self.rafs.mounted()
        if not mounted:
            return {}
        with self.ms.transaction(writable=False) as tx:
            snaps = store.snapshots_by_id(tx)
        refs = {}
        for sid in mounted:
            found = snaps.get(sid)
            ref = L.image_ref(found[0].labels) if found else None
            if ref:
                refs[sid] = ref
        return refs

    def _remove_dir(self, sid: str) -> bool:
        path = snapshot_dir(self.root, sid)
        if not os.path.lexists(path):
            return False
        for sub in ("mnt", "fs"):  # where a RAFS instance (dedicated mode) or a user could mount
            if os.path.ismount(os.path.join(path, sub)):
                log.warning("not removing %s: %s is still a mountpoint", path, os.path.join(path, sub))
                return False
        try:
            shutil.rmtree(path)
            return True
        except OSError:
            log.warning("failed to remove directory %s", path, exc_info=True)
            return False

    # -- cache (storage's file cache owns the files, their locks and the GC) ----------------

    def blobs_in_use(self) -> set[str]:
        """Blob ids (layer digest hex) of every nydus data layer and bootstrap the store knows."""
        in_use: set[str] = set()
        with self.ms.transaction(writable=False) as tx:
            snaps = store.snapshots_by_id(tx)
        for sid, (info, _) in snaps.items():
            if L.is_nydus_data_layer(info.labels):
                try:
                    blob = L.layer_blob_id(info.labels)
                except InvalidArgument:
                    blob = None
                if blob:
                    in_use.add(blob)
            elif L.is_nydus_meta_layer(info.labels):
                boot = find_bootstrap(upper_path(self.root, sid))
                in_use |= bootstrap_blob_ids(boot) if boot else set()
        return in_use

    def cache_size(self) -> int:
        return cache_dir_usage(self.config.cache_dir)

    def gc_cache(self) -> list[str]:
        """Delete the cache files of blobs no snapshot uses and no daemon holds open (storage's
        ``gc_cache_dir``, which takes each blob's lock); returns the deleted blob ids."""
        if not os.path.isdir(self.config.cache_dir):
            return []
        try:
            deleted = gc_cache_dir(self.config.cache_dir, self.blobs_in_use())
        except OSError:  # GC must never fail Cleanup
            log.warning("cache GC of %s failed", self.config.cache_dir, exc_info=True)
            self.gc_errors += 1
            return []
        self.gc_deleted += len(deleted)
        return deleted

    def counts(self) -> dict[str, int]:
        with self.ms.transaction(writable=False) as tx:
            by_kind = store.counts_by_kind(tx)
        return {k.name.lower(): by_kind.get(k, 0) for k in (Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED)}
