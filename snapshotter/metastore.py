"""The snapshot metastore: sqlite (WAL) with containerd's bolt-store semantics.

One call, one transaction: callers write ``with ms.transaction(writable) as tx:`` and pass ``tx``
to the store functions below, which never open a transaction of their own. A writable
transaction starts with ``BEGIN IMMEDIATE`` (so two writers never deadlock on upgrade), commits
on a clean exit and rolls back otherwise.

Error texts follow containerd's ``snapshots/storage/bolt.go`` so clients that match on message
text (containerd's conformance suite does) see the same words.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterator, Mapping, Sequence

from snapshotter import labels as L
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotterError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL UNIQUE,
    parent   TEXT NOT NULL DEFAULT '',
    kind     INTEGER NOT NULL,
    created  INTEGER NOT NULL,
    updated  INTEGER NOT NULL,
    size     INTEGER NOT NULL DEFAULT 0,
    inodes   INTEGER NOT NULL DEFAULT 0,
    labels   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


class Kind(IntEnum):
    """Snapshot kinds, numbered like containerd's ``snapshots.v1.Kind``."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True, slots=True)
class Info:
    """What ``Stat``/``List`` report about one snapshot (times in ns since the epoch, UTC)."""

    name: str
    parent: str
    kind: Kind
    created: int
    updated: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk usage of a snapshot: bytes and inodes."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot's id, kind and its parents' ids (nearest first) — what ``mounts()`` needs."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...] = ()


class Transaction:
    """A handle on one open sqlite transaction (only valid inside ``ms.transaction()``)."""

    __slots__ = ("_conn", "writable", "_open")

    def __init__(self, conn: sqlite3.Connection, writable: bool) -> None:
        self._conn = conn
        self.writable = writable
        self._open = True

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        if not self._open:
            raise SnapshotterError("transaction is closed")
        return self._conn.execute(sql, params)

    def require_writable(self) -> None:
        if not self.writable:
            raise SnapshotterError("write in a read-only transaction")


class MetaStore:
    """The sqlite file ``<root>/metadata.db``; one connection guarded by a lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self.transaction(writable=True) as tx:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    tx.execute(stmt)
            row = tx.execute("SELECT value FROM meta WHERE key='version'").fetchone()
            if row is None:
                tx.execute("INSERT INTO meta(key, value) VALUES ('version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise SnapshotterError(f"metastore {path}: schema version {row[0]}, want {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self, writable: bool) -> Iterator[Transaction]:
        """Run the body in one transaction; commit on success (if writable), else roll back."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if writable else "BEGIN")
            tx = Transaction(self._conn, writable)
            try:
                yield tx
            except BaseException:
                tx._open = False
                self._conn.execute("ROLLBACK")
                raise
            tx._open = False
            if writable:
                self._conn.execute("COMMIT")
            else:
                self._conn.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# --------------------------------------------------------------------------- store functions


def _now_ns() -> int:
    return time.time_ns()


def _labels_json(labels: Mapping[str, str] | None) -> str:
    """Labels as stored; an empty value deletes the label (as containerd's bolt store does)."""
    # credential labels are never stored (snapshotter.pull_credentials keeps them, 0600)
    return json.dumps({k: v for k, v in (labels or {}).items() if v != "" and k not in L.CREDENTIAL_LABELS},
                      sort_keys=True)


def _row_info(row: sqlite3.Row | tuple) -> Info:
    key, parent, kind, created, updated, labels = row
    return Info(name=key, parent=parent, kind=Kind(kind), created=created, updated=updated,
                labels=L.without_credentials(json.loads(labels)))  # a database from before they were dropped


def _row(tx: Transaction, key: str) -> tuple | None:
    return tx.execute(
        "SELECT id, key, parent, kind, created, updated, size, inodes, labels FROM snapshots WHERE key=?",
        (key,)).fetchone()


def get_info(tx: Transaction, key: str) -> tuple[str, Info, Usage]:
    """``(id, info, usage)`` of ``key``; NotFound if missing."""
    row = _row(tx, key)
    if row is None:
        raise NotFound(f"snapshot {key}")
    sid, k, parent, kind, created, updated, size, inodes, labels = row
    return str(sid), _row_info((k, parent, kind, created, updated, labels)), Usage(size, inodes)


_LINEAGE = """
WITH RECURSIVE chain(depth, id, key, parent, kind, created, updated, labels) AS (
    SELECT 0, id, key, parent, kind, created, updated, labels FROM snapshots WHERE key = ?
    UNION ALL
    SELECT chain.depth + 1, s.id, s.key, s.parent, s.kind, s.created, s.updated, s.labels
    FROM snapshots AS s JOIN chain ON s.key = chain.parent
    WHERE chain.parent != '' AND chain.depth < 100000
)
SELECT id, key, parent, kind, created, updated, labels FROM chain ORDER BY depth
"""


def lineage(tx: Transaction, key: str) -> list[tuple[str, Info]]:
    """``(id, info)`` of ``key`` and every ancestor, nearest first (one query); [] if missing.

    NotFound if an ancestor is missing (a broken chain)."""
    rows = tx.execute(_LINEAGE, (key,)).fetchall()
    out = [(str(r[0]), _row_info(r[1:])) for r in rows]
    if out and out[-1][1].parent:
        raise NotFound("missing parent")
    return out


def parent_ids(tx: Transaction, parent: str) -> tuple[str, ...]:
    """Ids of ``parent`` and all its ancestors, nearest first."""
    if not parent:
        return ()
    chain = lineage(tx, parent)
    if not chain:
        raise NotFound("missing parent")
    return tuple(sid for sid, _ in chain)


def parent_chain(tx: Transaction, parent: str) -> list[tuple[str, Info]]:
    """``(id, info)`` of ``parent`` and every ancestor, nearest first."""
    if not parent:
        return []
    chain = lineage(tx, parent)
    if not chain:
        raise NotFound(f"snapshot {parent}")
    return chain


def get_snapshot_chain(tx: Transaction, key: str) -> tuple[Snapshot, list[tuple[str, Info]]]:
    """The active or view snapshot ``key`` and its lineage (self first) — what Mounts needs."""
    try:
        chain = lineage(tx, key)
    except NotFound as exc:
        raise NotFound("parent does not exist") from exc
    if not chain:
        raise NotFound("snapshot does not exist")
    sid, info = chain[0]
    if info.kind not in (Kind.ACTIVE, Kind.VIEW):
        raise FailedPrecondition(f"requested snapshot {key} not active or view")
    return Snapshot(id=sid, kind=info.kind, parent_ids=tuple(i for i, _ in chain[1:])), chain


def create_snapshot(tx: Transaction, kind: Kind, key: str, parent: str,
                    labels: Mapping[str, str] | None = None) -> Snapshot:
    """Insert an active or view snapshot ``key`` on top of committed ``parent``."""
    tx.require_writable()
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgument(
            f"snapshot type {kind.name} invalid; only snapshots of type Active or View can be created")
    pids: tuple[str, ...] = ()
    if parent:
        prow = tx.execute("SELECT kind FROM snapshots WHERE key=?", (parent,)).fetchone()
        if prow is None:
            raise NotFound(f'missing parent "{parent}" bucket')
        if Kind(prow[0]) != Kind.COMMITTED:
            raise InvalidArgument(f'parent "{parent}" is not committed snapshot')
        pids = parent_ids(tx, parent)
    if _row(tx, key) is not None:
        raise AlreadyExists(f"snapshot {key}")
    now = _now_ns()
    cur = tx.execute(
        "INSERT INTO snapshots(key, parent, kind, created, updated, labels) VALUES (?,?,?,?,?,?)",
        (key, parent, int(kind), now, now, _labels_json(labels)))
    return Snapshot(id=str(cur.lastrowid), kind=kind, parent_ids=pids)


def commit_active(tx: Transaction, key: str, name: str, usage: Usage,
                  labels: Mapping[str, str] | None = None) -> str:
    """Turn active ``key`` into committed ``name`` (same id, created == updated); returns the id."""
    tx.require_writable()
    if _row(tx, name) is not None:
        raise AlreadyExists(f"committed snapshot {name}")
    row = _row(tx, key)
    if row is None:
        raise NotFound(f'failed to get active snapshot "{key}"')
    if Kind(row[3]) != Kind.ACTIVE:
        raise FailedPrecondition(f'snapshot "{key}" is not active')
    now = _now_ns()
    tx.execute(
        "UPDATE snapshots SET key=?, kind=?, created=?, updated=?, size=?, inodes=?, labels=? WHERE id=?",
        (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes,
         _labels_json(labels), row[0]))
    return str(row[0])


def remove(tx: Transaction, key: str) -> tuple[str, Kind]:
    """Delete ``key`` (FailedPrecondition if it has children); returns ``(id, kind)``."""
    tx.require_writable()
    row = _row(tx, key)
    if row is None:
        raise NotFound(f"snapshot {key}")
    child = tx.execute("SELECT 1 FROM snapshots WHERE parent=? LIMIT 1", (key,)).fetchone()
    if child is not None:
        raise FailedPrecondition("cannot remove snapshot with child")
    tx.execute("DELETE FROM snapshots WHERE id=?", (row[0],))
    return str(row[0]), Kind(row[3])


def update_info(tx: Transaction, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
    """Update the mutable fields (labels) of ``info.name``; ``fieldpaths`` like containerd's."""
    tx.require_writable()
    row = _row(tx, info.name)
    if row is None:
        raise NotFound("snapshot does not exist")
    current = _row_info(row[1:6] + (row[8],))
    labels = dict(current.labels)
    if fieldpaths:
        for path in fieldpaths:
            if path.startswith("labels."):
                lkey = path[len("labels."):]
                labels[lkey] = info.labels.get(lkey, "")
            elif path == "labels":
                labels = dict(info.labels)
            else:
                raise InvalidArgument(f'cannot update "{path}" field on snapshot "{info.name}"')
    else:
        labels = dict(info.labels)
    now = _now_ns()
    tx.execute("UPDATE snapshots SET labels=?, updated=? WHERE id=?",
               (_labels_json(labels), now, row[0]))
    return Info(name=current.name, parent=current.parent, kind=current.kind, created=current.created,
                updated=now, labels={k: v for k, v in labels.items() if v != "" and k not in L.CREDENTIAL_LABELS})


def walk_info(tx: Transaction, match: Callable[[Info], bool] | None = None) -> list[Info]:
    """Every snapshot (ordered by key) for which ``match`` is true."""
    rows = tx.execute(
        "SELECT key, parent, kind, created, updated, labels FROM snapshots ORDER BY key").fetchall()
    infos = [_row_info(r) for r in rows]
    return [i for i in infos if match is None or match(i)]


def id_map(tx: Transaction) -> dict[str, str]:
    """``{id: key}`` of every snapshot."""
    return {str(i): k for i, k in tx.execute("SELECT id, key FROM snapshots").fetchall()}


def snapshots_by_id(tx: Transaction) -> dict[str, tuple[Info, Usage]]:
    """``{id: (info, usage)}`` of every snapshot."""
    out: dict[str, tuple[Info, Usage]] = {}
    for row in tx.execute(
            "SELECT id, key, parent, kind, created, updated, size, inodes, labels FROM snapshots"):
        out[str(row[0])] = (_row_info(row[1:6] + (row[8],)), Usage(row[6], row[7]))
    return out


def counts_by_kind(tx: Transaction) -> dict[Kind, int]:
    """Number of snapshots of each kind."""
    return {Kind(k): n for k, n in tx.execute("SELECT kind, count(*) FROM snapshots GROUP BY kind")}
