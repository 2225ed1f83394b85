"""The cloud's shard store: content-addressed files plus a SQLite catalog.

    STORE/objects/<aa>/<sha256>            verified shards, read-only, stored once whoever sent them
    STORE/incoming/<owner>/<sha256>.part   uploads in progress; never visible as objects
    STORE/catalog.sqlite                   owners' key domains, datasets, their shards and counts

A shard becomes an object only after its whole content matched its sha256, by an atomic rename.
Owners never read through this API, and content addressing means nobody can overwrite anybody's
data: the same name always holds the same bytes. Identical shards are stored once on disk, but
an owner holds a shard only after sending all of its bytes itself: knowing a hash is not enough
to claim somebody else's data for training. Everything an owner sends is checked here,
transport-independent; the gRPC servicer only translates.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import (
    Busy,
    DataCorrupted,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    StorageFull,
    StorageUnavailable,
    WrongState,
)
from orchestrator.keypolicy import KeyPolicy
from protocol.shards import Manifest, ManifestError, inspect_shard
from protocol.task import Task

SCHEMA = """
CREATE TABLE IF NOT EXISTS key_domains (
    owner TEXT NOT NULL, key_id TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (owner, key_id));
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, split TEXT NOT NULL, key_id TEXT, scheme TEXT NOT NULL,
    images INTEGER NOT NULL, manifest TEXT NOT NULL, committed INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dataset_shards (
    dataset_id TEXT NOT NULL REFERENCES datasets(id), name TEXT NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, images INTEGER NOT NULL, PRIMARY KEY (dataset_id, name));
CREATE TABLE IF NOT EXISTS objects (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, stored REAL NOT NULL);
CREATE TABLE IF NOT EXISTS owner_objects (
    owner TEXT NOT NULL, sha256 TEXT NOT NULL REFERENCES objects(sha256), PRIMARY KEY (owner, sha256));
CREATE TABLE IF NOT EXISTS quarantine (
    owner TEXT NOT NULL, dataset_id TEXT NOT NULL, since REAL NOT NULL, PRIMARY KEY (owner, dataset_id));
"""
# quarantine: the operator's hold on data (``orchestrator datasets``); dataset_id '' holds every dataset
# of the owner, present and future. A table of its own, so an existing catalog gains it in place (the
# CREATE above) with no column to migrate. Kept on disk, never trained on, released by deleting the row.
QUARANTINED = "EXISTS (SELECT 1 FROM quarantine q WHERE q.owner = d.owner AND q.dataset_id IN ('', d.id))"
DATASET_ID_PREFIX = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass(frozen=True)
class ShardProgress:
    name: str
    sha256: str
    size: int
    received: int  # bytes held; == size once stored
    stored: bool


@dataclass(frozen=True)
class Removed:
    """What ``ShardStore.remove`` deleted."""

    datasets: tuple[str, ...]  # dataset ids
    objects: int  # object files no other owner held
    bytes: int  # their size
    partial_files: int  # unfinished uploads of the owner's


@dataclass(frozen=True)
class DatasetState:
    dataset_id: str
    owner: str
    split: str
    key_id: str | None
    shards: tuple[ShardProgress, ...]
    committed: bool
    images: int


@contextlib.contextmanager
def catalog_errors():
    """The catalog could not be read or written: a full disk (SQLite's own error code, SQLITE_FULL)
    is StorageFull, which waits for the operator; anything else (I/O error, locked too long) a
    retryable StorageUnavailable. Both carry SQLite's words; nothing half-written stays behind."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise StorageFull(f"the server's disk is full: its catalog cannot grow ({exc}); nothing was recorded. "
                              "The cloud's operator must free space") from None
        raise StorageUnavailable(f"the server's catalog is unavailable ({exc}); nothing was recorded, try "
                                 "again later") from None


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the server's own disk quota reached


def write_error(exc: OSError, what: str) -> StorageUnavailable:
    """The refusal for an OSError while writing ``what``: by errno, never by its words."""
    if exc.errno in DISK_FULL:
        return StorageFull(f"the server's disk is full ({exc.strerror}) while writing {what}; what was verified "
                           "before is kept. The cloud's operator must free space")
    return StorageUnavailable(f"the server could not write {what}: {exc.strerror}")


TAKE_OVER_WAIT_S = 30.0  # a newer stream waits this long for the older one to let go (it may be verifying)


def hash_file(path: Path):
    """sha256 state of a whole file, read in 1 MiB blocks (about 0.7 CPU-s per GiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


@dataclass(frozen=True)
class _PartialDigest:
    held: int  # bytes of the partial file the digest covers
    identity: tuple[int, int, int] | None  # the file's (size, mtime, inode) then
    digest: object  # hashlib sha256 state


@dataclass(eq=False)
class _UploadHolder:
    """The stream that holds one (owner, shard): ``stop`` asks it to end (a newer stream takes over)."""

    size: int  # the shard's full size: what an open stream counts against its owner's quota
    stop: Callable[[], None] = field(default=lambda: None)


class ShardStore:
    def __init__(self, root: Path, task: Task, max_shard_bytes: int = 1 << 30,
                 key_policy: KeyPolicy | None = None, owner_quota_bytes: int | None = None,
                 partial_expiry_s: float | None = None) -> None:
        """``owner_quota_bytes``: what one owner may hold (objects + partial uploads), None: no quota;
        ``partial_expiry_s``: partial uploads untouched this long are deleted whenever
        :meth:`expire_partials` runs (the ingest service: at start, then periodically), None: kept
        forever. The ingest service passes the config's."""
        self.root = Path(root)
        self.task = task
        self.key_policy = key_policy or KeyPolicy()  # who may upload under which key id
        self.max_shard_bytes = max_shard_bytes
        self.owner_quota_bytes = owner_quota_bytes
        self.partial_expiry_s = partial_expiry_s
        for sub in ("objects", "incoming"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "catalog.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._uploads_changed = threading.Condition()  # guards the two below; notified when a stream lets go
        self._uploads_in_progress: dict[tuple[str, str], _UploadHolder] = {}
        # (owner, sha256) -> the sha256 state of a partial file's bytes and the file's identity when the
        # last stream ended: a resume continues hashing instead of reading the file again
        self._partial_digests: dict[tuple[str, str], _PartialDigest] = {}

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    # ------------------------------------------------------------------ paths and catalog

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def _partial_path(self, owner: str, sha256: str) -> Path:
        return self.root / "incoming" / owner / f"{sha256}.part"

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock, catalog_errors():
            return self._db.execute(sql, args).fetchall()

    def _is_stored(self, owner: str, sha256: str) -> bool:
        return bool(self._query("SELECT 1 FROM owner_objects WHERE owner = ? AND sha256 = ?", (owner, sha256)))

    # ------------------------------------------------------------------ datasets

    def _check_task(self, m: Manifest) -> None:
        t = self.task
        expected = {
            "classes": (list(m.classes), list(t.classes)),
            "image_size": (m.image_size, t.image_size),
            "scheme": (m.scheme, t.scheme),
            "codec.format": (m.codec.get("format"), t.format),
        }
        if t.scheme != "plain":
            expected["block_size"] = (m.block_size, t.block_size)
        if t.format == "jpeg":
            expected["codec.quality"] = (m.codec.get("quality"), t.quality)
            expected["codec.chroma"] = (m.codec.get("chroma"), t.chroma)
        for name, (got, want) in expected.items():
            if got != want:
                raise WrongState(f"manifest {name} is {got!r} but the task says {want!r}: re-encrypt for this task")
        for shard in m.shards:
            if shard.bytes > self.max_shard_bytes:
                raise InvalidRequest(f"{shard.name} is {shard.bytes} bytes, over the "
                                                     f"{self.max_shard_bytes}-byte limit")

    def open_dataset(self, owner: str, manifest_json: bytes, new_key_domain: bool = False) -> DatasetState:
        try:
            manifest = Manifest.parse(manifest_json, "manifest.json")
        except ManifestError as exc:
            raise InvalidRequest(str(exc)) from None
        self._check_task(manifest)
        dataset_id = hashlib.sha256(owner.encode() + b"\0" + manifest_json).hexdigest()
        with self._db_lock, catalog_errors():
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if manifest.key_id is not None:
                    self._register_key(owner, manifest, new_key_domain)
                exists = db.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
                if not exists:
                    db.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                               (dataset_id, owner, manifest.split, manifest.key_id, manifest.scheme,
                                manifest.count, manifest_json.decode("utf-8"), time.time()))
                    db.executemany("INSERT INTO dataset_shards VALUES (?, ?, ?, ?, ?)",
                                   [(dataset_id, s.name, s.sha256, s.bytes, s.count) for s in manifest.shards])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                    db.execute("ROLLBACK")
                raise
        return self.dataset_state(owner, dataset_id)

    def _register_key(self, owner: str, manifest: Manifest, new_key_domain: bool) -> None:
        """Inside open_dataset's transaction: may ``owner`` upload under the manifest's key id?"""
        db, key_id = self._db, manifest.key_id
        known = [r[0] for r in db.execute("SELECT key_id FROM key_domains WHERE owner = ?", (owner,))]
        if known and key_id not in known and not new_key_domain:
            raise WrongState(
                f"owner {owner} uploaded before with key id {', '.join(known)}; this data has key id "
                f"{key_id}. A model trained on one cannot classify the other. If you meant "
                "to start a new key domain, rerun with --new-key-domain")
        holders = {r[0] for r in db.execute("SELECT owner FROM key_domains WHERE key_id = ?", (key_id,))}
        train_keys = {r[0] for r in db.execute(
            "SELECT DISTINCT key_id FROM datasets WHERE split = 'train' AND key_id IS NOT NULL")}
        self.key_policy.check(owner, key_id, manifest.split, holders, train_keys)
        db.execute("INSERT OR IGNORE INTO key_domains VALUES (?, ?, ?)", (owner, key_id, time.time()))

    def dataset_state(self, owner: str, dataset_id: str) -> DatasetState:
        row = self._query("SELECT owner, split, key_id, committed, images FROM datasets WHERE id = ?", (dataset_id,))
        if not row or row[0][0] != owner:  # another owner's dataset looks exactly like a missing one
            raise NotFound(f"no dataset {dataset_id} for owner {owner}: open it first")
        _, split, key_id, committed, images = row[0]
        shards = []
        for name, sha, size in self._query(
                "SELECT name, sha256, size FROM dataset_shards WHERE dataset_id = ? ORDER BY name", (dataset_id,)):
            stored = self._is_stored(owner, sha)
            partial = self._partial_path(owner, sha)
            received = size if stored else (partial.stat().st_size if partial.exists() else 0)
            shards.append(ShardProgress(name, sha, size, received, stored))
        return DatasetState(dataset_id, owner, split, key_id, tuple(shards), bool(committed), images)

    def commit_dataset(self, owner: str, dataset_id: str) -> DatasetState:
        state = self.dataset_state(owner, dataset_id)
        missing = [s.name for s in state.shards if not s.stored]
        if missing:
            raise WrongState(f"cannot commit: {len(missing)} shard(s) not uploaded yet "
                                                    f"({', '.join(missing[:5])})")
        self._query("UPDATE datasets SET committed = 1 WHERE id = ?", (dataset_id,))
        return self.dataset_state(owner, dataset_id)

    # ------------------------------------------------------------------ shard uploads

    def begin_upload(self, owner: str, dataset_id: str, sha256: str, offset: int,
                     stop: Callable[[], None] = lambda: None) -> ShardUpload:
        """Start one stream of one shard. ``stop`` ends this stream from outside (the transport's
        cancel): a newer stream of the same owner and shard calls it to take over (see _take_over).
        Refused when the owner's quota has no room for the rest of the shard."""
        rows = self._query("SELECT d.owner, s.size, s.images FROM dataset_shards s JOIN datasets d "
                           "ON d.id = s.dataset_id WHERE s.dataset_id = ? AND s.sha256 = ?", (dataset_id, sha256))
        if not rows or rows[0][0] != owner:
            raise NotFound(f"shard {sha256[:12]}... is not part of dataset {dataset_id} of {owner}")
        size, images = rows[0][1], rows[0][2]
        key, holder = (owner, sha256), _UploadHolder(size, stop)
        with self._uploads_changed:
            self._take_over(key)
            self._check_quota(owner, sha256, size)  # under the lock: the owner's streams count each other
            self._uploads_in_progress[key] = holder
        try:
            return ShardUpload(self, owner, sha256, size, offset, images, holder)
        except BaseException:
            self._end_upload(key, holder)
            raise

    def _take_over(self, key: tuple[str, str]) -> None:
        """With the uploads lock held: end the stream that still holds this shard and wait until it
        lets go. The newest stream wins because only the owner's token opens one, and the owner's
        newest process is the live one: a stalled or killed agent's stream would otherwise block
        its own rerun until a deadline (an hour for 1 GiB). What the old stream wrote is kept; its
        agent, if alive, asks where to resume like after any interruption."""
        deadline = time.monotonic() + TAKE_OVER_WAIT_S
        while (holder := self._uploads_in_progress.get(key)) is not None:  # a third stream may come in between
            holder.stop()
            let_go = self._uploads_changed.wait_for(lambda h=holder: self._uploads_in_progress.get(key) is not h,
                                                    max(0.0, deadline - time.monotonic()))
            if not let_go:
                raise Busy(f"another upload of shard {key[1][:12]}... is still being verified; retry in a minute")

    def _end_upload(self, key: tuple[str, str], holder: _UploadHolder) -> None:
        with self._uploads_changed:
            if self._uploads_in_progress.get(key) is holder:  # not a newer stream's hold
                del self._uploads_in_progress[key]
                self._uploads_changed.notify_all()

    def _store_object(self, owner: str, partial: Path, sha256: str, size: int) -> None:
        target = self.object_path(sha256)
        try:
            target.parent.mkdir(exist_ok=True)
            if target.exists():  # the same bytes arrived from elsewhere: keep one copy
                partial.unlink()
            else:
                os.chmod(partial, 0o444)
                os.replace(partial, target)
        except OSError as exc:
            raise write_error(exc, f"shard {sha256[:12]}...") from None
        self._query("INSERT OR IGNORE INTO objects VALUES (?, ?, ?)", (sha256, size, time.time()))
        self._query("INSERT OR IGNORE INTO owner_objects VALUES (?, ?)", (owner, sha256))

    # ------------------------------------------------------------------ limits on what an owner holds

    def owner_usage(self, owner: str, counting: str | None = None) -> int:
        """Bytes ``owner`` holds against its quota: its stored objects, its partial files, and every
        open stream of it at its shard's full size (what it may still write), ``counting`` included
        (a shard about to be streamed)."""
        stored = self._query("SELECT COALESCE(SUM(o.size), 0) FROM owner_objects oo JOIN objects o "
                             "ON o.sha256 = oo.sha256 WHERE oo.owner = ?", (owner,))[0][0]
        with self._uploads_changed:  # re-entrant: begin_upload calls this with it held
            streaming = {sha: h.size for (o, sha), h in self._uploads_in_progress.items() if o == owner}
        total = stored + sum(streaming.values())
        for part in (self.root / "incoming" / owner).glob("*.part"):
            if part.stem not in streaming and part.stem != counting:
                with contextlib.suppress(FileNotFoundError):
                    total += part.stat().st_size
        return total

    def received_bytes(self) -> dict[str, int]:
        """Bytes each owner has sent that are on disk: its stored objects and its partial uploads."""
        rows = self._query("SELECT oo.owner, SUM(o.size) FROM owner_objects oo JOIN objects o ON o.sha256 = oo.sha256 "
                           "GROUP BY oo.owner")
        received = {owner: size for owner, size in rows}
        for folder in (self.root / "incoming").iterdir():
            for part in folder.glob("*.part"):
                with contextlib.suppress(FileNotFoundError):  # stored or expired meanwhile
                    received[folder.name] = received.get(folder.name, 0) + part.stat().st_size
        return received

    def _check_quota(self, owner: str, sha256: str, size: int) -> None:
        if self.owner_quota_bytes is None or self._is_stored(owner, sha256):
            return
        used = self.owner_usage(owner, counting=sha256)
        if used + size > self.owner_quota_bytes:
            raise QuotaExceeded(
                f"owner {owner} holds {used:,} bytes; shard {sha256[:12]}... ({size:,} bytes) would pass its "
                f"quota of {self.owner_quota_bytes:,} bytes (ingest.owner_quota_bytes); nothing was stored. "
                "Ask the cloud's operator to raise the quota or remove data you no longer need")

    def check_room_for(self, owner: str, manifest_json: bytes) -> None:
        """Before a dataset is opened: refuse it when the bytes it still needs do not fit the owner's
        quota, so the owner learns before sending anything. A manifest that does not parse is left
        to open_dataset's own refusal. Streams are checked again one by one (begin_upload)."""
        if self.owner_quota_bytes is None:
            return
        try:
            shards = {s.sha256: s.bytes for s in Manifest.parse(manifest_json, "manifest.json").shards}
        except ManifestError:
            return
        needed = 0
        for sha, size in shards.items():
            if not self._is_stored(owner, sha):
                partial = self._partial_path(owner, sha)
                needed += max(0, size - (partial.stat().st_size if partial.exists() else 0))
        used = self.owner_usage(owner)
        if used + needed > self.owner_quota_bytes:
            raise QuotaExceeded(
                f"owner {owner} holds {used:,} bytes; this dataset needs {needed:,} more, over its quota of "
                f"{self.owner_quota_bytes:,} bytes (ingest.owner_quota_bytes); nothing was stored. Ask the "
                "cloud's operator to raise the quota or remove data you no longer need")

    def expire_partials(self) -> list[Path]:
        """Delete partial uploads nobody has written to for ``partial_expiry_s`` (an agent that never
        came back), the file's mtime being the last write; a shard with an open stream is kept. Runs
        when the store opens and then periodically (the ingest service's sweeper). Returns what went."""
        if self.partial_expiry_s is None:
            return []
        cutoff, removed = time.time() - self.partial_expiry_s, []
        for part in sorted((self.root / "incoming").glob("*/*.part")):
            key = (part.parent.name, part.stem)
            with self._uploads_changed:  # no stream starts on this shard while it is judged
                if key in self._uploads_in_progress:
                    continue
                try:
                    if part.stat().st_mtime >= cutoff:
                        continue
                    part.unlink()
                except FileNotFoundError:
                    continue
                self._partial_digests.pop(key, None)
            removed.append(part)
        return removed

    def _resume_digest(self, owner: str, sha256: str, partial: Path, held: int):
        """The sha256 state of the ``held`` bytes of a partial file: the one kept when its last stream
        ended if the file is still that file (size, mtime, inode), else read once (after a restart)."""
        with self._uploads_changed:
            kept = self._partial_digests.pop((owner, sha256), None)
        if kept is not None and kept.held == held and kept.identity == _file_identity(partial):
            return kept.digest
        return hash_file(partial)

    def _keep_digest(self, owner: str, sha256: str, partial: Path, held: int, digest) -> None:
        entry = _PartialDigest(held, _file_identity(partial), digest.copy())
        with self._uploads_changed:
            self._partial_digests[(owner, sha256)] = entry

    # ------------------------------------------------------------------ reading (cloud side only)

    def key_ids_of(self, owner: str) -> set[str]:
        """The key ids ``owner`` has uploaded under (its key domains), less those whose every dataset
        is quarantined: predictions answer only for data the operator lets train."""
        if self._query("SELECT 1 FROM quarantine WHERE owner = ? AND dataset_id = ''", (owner,)):
            return set()
        domains = {r[0] for r in self._query("SELECT key_id FROM key_domains WHERE owner = ?", (owner,))}
        held: dict[str, bool] = {}  # key id -> some dataset under it is not quarantined
        for key_id, quarantined in self._query(f"SELECT d.key_id, {QUARANTINED} FROM datasets d WHERE d.owner = ?",
                                               (owner,)):
            held[key_id] = held.get(key_id, False) or not quarantined
        return {k for k in domains if held.get(k, True)}

    def committed_datasets(self, include_quarantined: bool = False) -> list[dict]:
        """Catalog rows of committed datasets: what training may read (quarantined ones only when asked)."""
        rows = self._query(f"SELECT d.id, d.owner, d.split, d.key_id, d.scheme, d.images, d.manifest, d.created, "
                           f"{QUARANTINED} FROM datasets d WHERE d.committed = 1 ORDER BY d.owner, d.split, d.created")
        return [{"id": r[0], "owner": r[1], "split": r[2], "key_id": r[3], "scheme": r[4], "images": r[5],
                 "manifest": json.loads(r[6]), "created": r[7], "quarantined": bool(r[8])}
                for r in rows if include_quarantined or not r[8]]

    # ------------------------------------------------------------------ the operator's lifecycle commands

    def datasets(self) -> list[dict]:
        """Every dataset, committed or not, with its state and its shards' bytes (``orchestrator datasets list``)."""
        rows = self._query(f"SELECT d.id, d.owner, d.split, d.key_id, d.images, d.committed, {QUARANTINED}, "
                           "(SELECT COALESCE(SUM(s.size), 0) FROM dataset_shards s WHERE s.dataset_id = d.id), "
                           "d.created FROM datasets d ORDER BY d.owner, d.created")
        return [{"id": r[0], "owner": r[1], "split": r[2], "key_id": r[3], "images": r[4], "committed": bool(r[5]),
                 "quarantined": bool(r[6]), "bytes": r[7], "created": r[8]} for r in rows]

    def _dataset_ids(self, owner: str, dataset: str | None) -> list[str]:
        """Ids of ``owner``'s datasets: all, or the one whose id starts with ``dataset``."""
        if dataset is not None and not DATASET_ID_PREFIX.match(dataset):
            raise InvalidRequest(f"--dataset {dataset!r}: expected a dataset id (8 to 64 lower-case hex digits)")
        ids = [r[0] for r in self._query("SELECT id FROM datasets WHERE owner = ? ORDER BY created", (owner,))
               if dataset is None or r[0].startswith(dataset)]
        if not ids:
            raise NotFound(f"owner {owner} has no dataset{'' if dataset is None else ' ' + dataset} in the store")
        if dataset is not None and len(ids) > 1:
            raise InvalidRequest(f"--dataset {dataset} matches {len(ids)} datasets of {owner}: give more digits")
        return ids

    def quarantine(self, owner: str, dataset: str | None = None) -> list[str]:
        """Hold one dataset of ``owner`` (or all of them, also those it uploads later) out of training
        and predictions; nothing is deleted. Returns the dataset ids held."""
        ids = self._dataset_ids(owner, dataset)
        self._query("INSERT OR IGNORE INTO quarantine VALUES (?, ?, ?)",
                    (owner, "" if dataset is None else ids[0], time.time()))
        return ids

    def release(self, owner: str, dataset: str | None = None) -> list[str]:
        """Undo :meth:`quarantine`: the owner as a whole (every hold on it), or one dataset."""
        ids = self._dataset_ids(owner, dataset)
        if dataset is None:
            self._query("DELETE FROM quarantine WHERE owner = ?", (owner,))
            return ids
        if self._query("SELECT 1 FROM quarantine WHERE owner = ? AND dataset_id = ''", (owner,)):
            raise WrongState(f"owner {owner} is quarantined as a whole: release the owner (without --dataset)")
        self._query("DELETE FROM quarantine WHERE owner = ? AND dataset_id = ?", (owner, ids[0]))
        return ids

    def remove(self, owner: str, dataset: str | None = None) -> Removed:
        """Delete one dataset of ``owner`` (or all its data): catalog rows, the objects no other owner
        holds, and its partial uploads of them. The catalog changes first, in one transaction; files
        go after it, so a crash in between leaves unreferenced files, never rows naming missing ones."""
        ids = self._dataset_ids(owner, dataset)
        with self._db_lock, catalog_errors():
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                dropped, orphans, freed = self._remove_rows(owner, ids, whole_owner=dataset is None)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        for sha in orphans:
            self.object_path(sha).unlink(missing_ok=True)
        if dataset is None:
            partials = list((self.root / "incoming" / owner).glob("*.part"))
        else:
            partials = [p for p in (self._partial_path(owner, sha) for sha in dropped) if p.exists()]
        for path in partials:
            path.unlink(missing_ok=True)
        return Removed(tuple(ids), len(orphans), freed, len(partials))

    def _remove_rows(self, owner: str, ids: list[str], whole_owner: bool) -> tuple[set[str], list[str], int]:
        """Inside remove's transaction: (objects the owner no longer holds, objects nobody holds, their bytes)."""
        db, marks = self._db, ",".join("?" * len(ids))
        shas = {r[0] for r in db.execute(f"SELECT sha256 FROM dataset_shards WHERE dataset_id IN ({marks})", ids)}
        db.execute(f"DELETE FROM dataset_shards WHERE dataset_id IN ({marks})", ids)
        db.execute(f"DELETE FROM datasets WHERE id IN ({marks})", ids)
        db.execute(f"DELETE FROM quarantine WHERE owner = ? AND dataset_id IN ({marks})", [owner, *ids])
        if whole_owner:
            shas |= {r[0] for r in db.execute("SELECT sha256 FROM owner_objects WHERE owner = ?", (owner,))}
            db.execute("DELETE FROM quarantine WHERE owner = ?", (owner,))
        still_used = {r[0] for r in db.execute("SELECT s.sha256 FROM dataset_shards s JOIN datasets d "
                                                "ON d.id = s.dataset_id WHERE d.owner = ?", (owner,))}
        dropped = shas - still_used
        orphans, freed = [], 0
        for sha in sorted(dropped):
            db.execute("DELETE FROM owner_objects WHERE owner = ? AND sha256 = ?", (owner, sha))
            if not db.execute("SELECT 1 FROM owner_objects WHERE sha256 = ?", (sha,)).fetchone():
                size = db.execute("SELECT size FROM objects WHERE sha256 = ?", (sha,)).fetchone()
                db.execute("DELETE FROM objects WHERE sha256 = ?", (sha,))
                if size is not None:
                    orphans.append(sha)
                    freed += size[0]
        # a key id the owner has no data under any more is no longer its key domain (nor its claim on it)
        db.execute("DELETE FROM key_domains WHERE owner = ? AND key_id NOT IN (SELECT key_id FROM datasets "
                   "WHERE owner = ? AND key_id IS NOT NULL)", (owner, owner))
        return dropped, orphans, freed


class _ChunkWriter(threading.Thread):
    """Hashes and appends verified chunks off the gRPC thread: receive, check and write overlap."""

    def __init__(self, path: Path, digest) -> None:
        super().__init__(daemon=True, name=f"write-{path.name[:12]}")
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the writer thread's lifetime, closed in close()
        self.digest = digest  # of exactly the bytes written: updated only after a chunk is all on disk
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write_all(data)
                    self.digest.update(data)
                except OSError as exc:  # disk full, I/O error: reported to the uploader
                    self.error = exc

    def _write_all(self, data: bytes) -> None:
        """An unbuffered write may take only part of the chunk (a disk filling up): write the rest."""
        view = memoryview(data)
        while view:
            view = view[self.file.write(view):]

    def put(self, data: bytes) -> None:
        self._raise()
        self.queue.put(data)

    def close(self, sync: bool) -> None:
        """Write everything queued (all of it was verified), then close; fdatasync when asked."""
        self.queue.put(None)
        self.join()
        try:
            if sync and self.error is None:
                os.fdatasync(self.file.fileno())
        except OSError as exc:
            self.error = exc
        finally:
            self.file.close()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise write_error(self.error, "the shard")


class ShardUpload:
    """One upload stream of one shard: append verified chunks from the server's offset on."""

    def __init__(self, store: ShardStore, owner: str, sha256: str, size: int, offset: int, images: int,
                 holder: _UploadHolder) -> None:
        self.store, self.owner, self.sha256, self.size = store, owner, sha256, size
        self.images = images  # samples the owner's manifest declares for this shard
        self.partial = store._partial_path(owner, sha256)
        self.stored = store._is_stored(owner, sha256)
        held = size if self.stored else (self.partial.stat().st_size if self.partial.exists() else 0)
        if offset != held:
            raise WrongState(f"upload starts at byte {offset} but the server holds {held} "
                                                    f"bytes of this shard; resume from {held}")
        self.received = held
        self._holder = holder
        self._writer: _ChunkWriter | None = None
        self._write_failed = False  # then the digest may not match the file: never kept for a resume
        self._ended = False
        # of everything held, so finishing needs no second read and resuming (usually) no first one
        held_partial = held and not self.stored
        self._digest = store._resume_digest(owner, sha256, self.partial, held) if held_partial else hashlib.sha256()

    def write(self, data: bytes, data_crc32: int) -> None:
        if self.stored:
            raise WrongState("shard already stored; nothing more to send")
        if zlib.crc32(data) != data_crc32:
            raise DataCorrupted(f"chunk at byte {self.received} does not match its CRC-32; not stored")
        if self.received + len(data) > self.size:
            raise InvalidRequest(f"chunk at byte {self.received} runs past the shard's "
                                                 f"{self.size} bytes")
        if self._writer is None:
            try:
                self.partial.parent.mkdir(parents=True, exist_ok=True)
                self._writer = _ChunkWriter(self.partial, self._digest)
            except OSError as exc:
                raise write_error(exc, "the shard") from None
        self._writer.put(data)
        self.received += len(data)

    def finish(self) -> ShardProgress:
        """Close the stream; store the shard if it is complete and its sha256 matches."""
        try:
            self._close_writer(sync=True)
            if not self.stored and self.received == self.size:
                if self._digest.hexdigest() != self.sha256:
                    self.partial.unlink()
                    raise DataCorrupted(f"shard {self.sha256[:12]}... arrived complete but its sha256 "
                                                  "does not match; discarded, upload it again")
                self._inspect()
                self.store._store_object(self.owner, self.partial, self.sha256, self.size)
                self.stored = True
            return ShardProgress("", self.sha256, self.size, self.received, self.stored)
        finally:
            self.abort()

    def _inspect(self) -> None:
        """Look inside before the shard becomes visible: training never meets what it cannot read."""
        try:
            inspect_shard(self.partial, self.store.task, self.images)
        except ManifestError as exc:
            self.partial.unlink()
            raise InvalidRequest(f"shard {self.sha256[:12]}... refused: {exc}; not stored") from None

    def _close_writer(self, sync: bool) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close(sync)
            except StorageUnavailable:
                self._write_failed = True
                raise

    def abort(self) -> None:
        """End the stream early (client gone, refused chunk, idle, superseded): keep what was verified
        and the sha256 state of it for the next stream, free the shard. Idempotent."""
        if self._ended:
            return
        self._ended = True
        with contextlib.suppress(StorageUnavailable):  # already failing; the partial file is what the disk took
            self._close_writer(sync=False)
        on_disk = _file_identity(self.partial)
        if not self.stored and not self._write_failed and on_disk is not None and on_disk[0] == self.received > 0:
            self.store._keep_digest(self.owner, self.sha256, self.partial, self.received, self._digest)
        self.store._end_upload((self.owner, self.sha256), self._holder)
