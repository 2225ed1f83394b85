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
import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import Busy, DataCorrupted, InvalidRequest, NotFound, StorageUnavailable, WrongState
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
"""


@dataclass(frozen=True)
class ShardProgress:
    name: str
    sha256: str
    size: int
    received: int  # bytes held; == size once stored
    stored: bool


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
    """The catalog could not be read or written (disk full, I/O error, locked too long): the owner
    is told so, with SQLite's words, as a retryable refusal; nothing half-written stays behind."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StorageUnavailable(f"the server's catalog is unavailable ({exc}); nothing was recorded, try "
                                 "again later") from None


class ShardStore:
    def __init__(self, root: Path, task: Task, max_shard_bytes: int = 1 << 30,
                 key_policy: KeyPolicy | None = None) -> None:
        self.root = Path(root)
        self.task = task
        self.key_policy = key_policy or KeyPolicy()  # who may upload under which key id
        self.max_shard_bytes = max_shard_bytes
        for sub in ("objects", "incoming"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "catalog.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._uploads_lock = threading.Lock()
        self._uploads_in_progress: set[tuple[str, str]] = set()

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

    def begin_upload(self, owner: str, dataset_id: str, sha256: str, offset: int) -> ShardUpload:
        rows = self._query("SELECT d.owner, s.size, s.images FROM dataset_shards s JOIN datasets d "
                           "ON d.id = s.dataset_id WHERE s.dataset_id = ? AND s.sha256 = ?", (dataset_id, sha256))
        if not rows or rows[0][0] != owner:
            raise NotFound(f"shard {sha256[:12]}... is not part of dataset {dataset_id} of {owner}")
        size, images = rows[0][1], rows[0][2]
        key = (owner, sha256)
        with self._uploads_lock:
            if key in self._uploads_in_progress:
                raise Busy(f"another upload of shard {sha256[:12]}... is in progress")
            self._uploads_in_progress.add(key)
        try:
            return ShardUpload(self, owner, sha256, size, offset, images)
        except BaseException:
            self._end_upload(key)
            raise

    def _end_upload(self, key: tuple[str, str]) -> None:
        with self._uploads_lock:
            self._uploads_in_progress.discard(key)

    def _store_object(self, owner: str, partial: Path, sha256: str, size: int) -> None:
        target = self.object_path(sha256)
        target.parent.mkdir(exist_ok=True)
        if target.exists():  # the same bytes arrived from elsewhere: keep one copy
            partial.unlink()
        else:
            os.chmod(partial, 0o444)
            os.replace(partial, target)
        self._query("INSERT OR IGNORE INTO objects VALUES (?, ?, ?)", (sha256, size, time.time()))
        self._query("INSERT OR IGNORE INTO owner_objects VALUES (?, ?)", (owner, sha256))

    # ------------------------------------------------------------------ reading (cloud side only)

    def key_ids_of(self, owner: str) -> set[str]:
        """The key ids ``owner`` has uploaded under (its key domains)."""
        return {r[0] for r in self._query("SELECT key_id FROM key_domains WHERE owner = ?", (owner,))}

    def committed_datasets(self) -> list[dict]:
        """Catalog rows of committed datasets: what training may read."""
        rows = self._query("SELECT id, owner, split, key_id, scheme, images, manifest FROM datasets "
                           "WHERE committed = 1 ORDER BY owner, split, created")
        return [{"id": r[0], "owner": r[1], "split": r[2], "key_id": r[3], "scheme": r[4], "images": r[5],
                 "manifest": json.loads(r[6])} for r in rows]


class _ChunkWriter(threading.Thread):
    """Hashes and appends verified chunks off the gRPC thread: receive, check and write overlap."""

    def __init__(self, path: Path, digest) -> None:
        super().__init__(daemon=True, name=f"write-{path.name[:12]}")
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the writer thread's lifetime, closed in close()
        self.digest = digest
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.digest.update(data)
                    self.file.write(data)
                except OSError as exc:  # disk full, I/O error: reported to the uploader
                    self.error = exc

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
        finally:
            self.file.close()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise StorageUnavailable(f"the server could not write the shard: {self.error.strerror}")


class ShardUpload:
    """One upload stream of one shard: append verified chunks from the server's offset on."""

    def __init__(self, store: ShardStore, owner: str, sha256: str, size: int, offset: int, images: int) -> None:
        self.store, self.owner, self.sha256, self.size = store, owner, sha256, size
        self.images = images  # samples the owner's manifest declares for this shard
        self.partial = store._partial_path(owner, sha256)
        self.stored = store._is_stored(owner, sha256)
        held = size if self.stored else (self.partial.stat().st_size if self.partial.exists() else 0)
        if offset != held:
            raise WrongState(f"upload starts at byte {offset} but the server holds {held} "
                                                    f"bytes of this shard; resume from {held}")
        self.received = held
        self._writer: _ChunkWriter | None = None
        self._digest = hashlib.sha256()  # of everything held, so finishing needs no second read
        if held and not self.stored:
            with open(self.partial, "rb") as f:
                while block := f.read(1 << 20):
                    self._digest.update(block)

    def write(self, data: bytes, data_crc32: int) -> None:
        if self.stored:
            raise WrongState("shard already stored; nothing more to send")
        if zlib.crc32(data) != data_crc32:
            raise DataCorrupted(f"chunk at byte {self.received} does not match its CRC-32; not stored")
        if self.received + len(data) > self.size:
            raise InvalidRequest(f"chunk at byte {self.received} runs past the shard's "
                                                 f"{self.size} bytes")
        if self._writer is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self._writer = _ChunkWriter(self.partial, self._digest)
        self._writer.put(data)
        self.received += len(data)

    def finish(self) -> ShardProgress:
        """Close the stream; store the shard if it is complete and its sha256 matches."""
        try:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                writer.close(sync=True)
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

    def abort(self) -> None:
        """End the stream early (client gone, refused chunk): keep what was verified, free the shard."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(StorageUnavailable):  # already failing; the partial file is what the disk took
                writer.close(sync=False)
        self.store._end_upload((self.owner, self.sha256))
