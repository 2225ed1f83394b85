"""``owner-agent encrypt``: image folder -> encrypted WebDataset shards in an outbox.

Pipeline, in chunks of ``chunk`` images, one chunk per worker process at a time: load and fit
-> encrypt the whole chunk with one compiled gather -> encode; the parent appends the results to
shards in input order (so the output is the same for any number of workers). The outbox gets:

    OUT/shard-NNNNN.tar, OUT/manifest.json     what an upload sends (no file names, no metadata)
    OUT/local/report.json, OUT/local/index.jsonl   stays with the owner: skipped files and reasons,
                                                  conversions, sample id -> source file
The manifest is written last, so an outbox without one is known to be incomplete.

Under a task with ``key_mode: per-image`` there is no owner key: every image is encrypted under a
schedule derived (by the cipher's own ``derive_schedule``) from a fresh ``os.urandom`` secret that
lives only while that image is encrypted; none is written, logged or sent, and the manifest's key
id is the sentinel ``per-image`` (``protocol.task.PER_IMAGE_KEY_ID``).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
from tqdm import tqdm

from owners import __version__
from owners.cipher import BlockCipher, CipherGeometry
from owners.errors import OutboxError, OwnerError, TaskMismatch
from owners.files import private_dir
from owners.images import BadImage, Scan, SourceImage, load_rgb, scan_image_folder
from owners.keys import SECRET_BYTES, OwnerKey
from protocol.shards import MANIFEST_NAME, Manifest, ShardWriter, atomic_write, sample_id
from protocol.task import PER_IMAGE_KEY_ID, Task

LOCAL_DIR = "local"  # inside the outbox; never uploaded


@dataclass(frozen=True)
class EncryptSettings:
    task: Task | None = None  # classes (label ids), image size, block, scheme, codec; None: the default
    # task over the folder's own class names (sorted). Images are resized (shorter side) and
    # centre-cropped to task.image_size.
    split: str = "train"  # "train" or "test": recorded in the manifest
    shard_images: int = 10_000  # samples per shard (~15 MB for 32x32 JPEG)
    chunk: int = 512  # images loaded, encrypted and encoded together (fewer when they are large:
    chunk_bytes: int = 64 << 20  # ...a chunk's pixels stay under this many bytes per worker process)
    max_bad_fraction: float = 0.2  # abort when more than this fraction of files fails...
    min_files_before_abort: int = 100  # ...once at least this many were tried
    workers: int = max(1, os.cpu_count() or 1)  # processes; decoding and encoding hold the GIL


@dataclass
class EncryptSummary:
    images: int = 0
    skipped: int = 0
    duplicates: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.images} images written, {self.skipped} skipped, {self.duplicates} duplicates; "
            f"{self.bytes_in / 1e6:.1f} MB in -> {self.bytes_out / 1e6:.1f} MB out; "
            f"{self.seconds:.1f} s, {rate:.0f} images/s"
        )


class TooManyBadFiles(OwnerError):
    pass


@dataclass(frozen=True)
class _Prepared:
    """What happened to one source image (computed in a worker, consumed in input order)."""

    relpath: str
    label: int
    encoded: bytes | None  # the stored file's bytes; None when the image was refused
    reason: str | None  # why it was refused
    notes: tuple[str, ...]  # conversions worth reporting
    bytes_in: int


class _ChunkEncoder:
    """Load, fit, encrypt and encode a chunk of images: the per-image work, free of shared state."""

    def __init__(self, secret: bytes | None, task: Task) -> None:
        self.task = task
        self.cipher = None if secret is None else BlockCipher(secret, CipherGeometry.for_task(task))

    def _encrypt(self, batch: np.ndarray) -> np.ndarray:
        if self.task.per_image_keys:
            return encrypt_per_image(batch, CipherGeometry.for_task(self.task))
        return batch if self.cipher is None else self.cipher.encrypt(batch)

    def __call__(self, items: list[SourceImage]) -> list[_Prepared]:
        loaded = []
        for item in items:
            try:
                nbytes = item.path.stat().st_size
                arr, notes = load_rgb(item.path, self.task.image_size)
                loaded.append((item, arr, None, tuple(notes), nbytes))
            except BadImage as exc:
                loaded.append((item, None, str(exc), (), 0))
            except OSError as exc:  # vanished or unreadable file
                loaded.append((item, None, f"cannot read: {exc.strerror or exc}", (), 0))
        good = [arr for _, arr, _, _, _ in loaded if arr is not None]
        stored = iter(())
        if good:
            batch = np.stack(good)
            stored = iter(self._encrypt(batch))
        return [
            _Prepared(item.relpath, item.label, None if arr is None else self.task.codec.encode(next(stored)),
                      reason, notes, nbytes)
            for item, arr, reason, notes, nbytes in loaded
        ]


def encrypt_per_image(images: np.ndarray, geometry: CipherGeometry) -> np.ndarray:
    """Each image under its own fresh key: a new random secret per image, through the cipher's own
    schedule derivation, so block order and per-block transforms are distributed exactly as under
    an owner's key. The secrets are dropped as soon as their image is encrypted."""
    return np.stack([BlockCipher(os.urandom(SECRET_BYTES), geometry).encrypt(image[None])[0] for image in images])


def key_for_task(task: Task, key: OwnerKey | None, plain_ok: bool, whose: str, log) -> OwnerKey | None:
    """The owner key to encrypt ``whose`` task's images under: none for a task with a fresh key per
    image (a key the owner named is unused, and it is told so), the owner's for other encrypted
    tasks, none for a plain task only when the owner asked for plain (``plain_ok``: --plain)."""
    if task.per_image_keys:
        if key is not None:
            log(f"--key {key.name} is unused: {whose} encrypts every image under its own fresh key, kept by nobody")
        return None
    if task.encrypted and key is None:
        raise TaskMismatch(f"{whose} uses scheme {task.scheme!r} with one key per owner: a --key is required")
    if not task.encrypted and (key is not None or not plain_ok):
        raise TaskMismatch(f"{whose} uses scheme {task.scheme!r}: images would leave unencrypted; use --plain "
                           "(no key) if that is what you want")
    return key


_worker_encoder: _ChunkEncoder | None = None  # one per worker process


def _init_worker(secret: bytes | None, task: Task) -> None:
    global _worker_encoder
    numba.set_num_threads(1)  # the processes already use every core
    _worker_encoder = _ChunkEncoder(secret, task)


def _encode_in_worker(items: list[SourceImage]) -> list[_Prepared]:
    assert _worker_encoder is not None
    return _worker_encoder(items)


def _prepared_chunks(items: list[SourceImage], secret: bytes | None, task: Task, settings: EncryptSettings,
                     stack: ExitStack) -> Iterator[list[_Prepared]]:
    """Chunks of results in input order; worker processes when there is more than one chunk.

    The secret reaches the workers through the pool's pipe (pickled init arguments), never
    through argv, the environment or a file.
    """
    size = max(1, min(settings.chunk, settings.chunk_bytes // (3 * task.image_size**2)))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    if settings.workers <= 1 or len(chunks) <= 1:
        encoder = _ChunkEncoder(secret, task)
        return (encoder(chunk) for chunk in chunks)
    # spawn, not fork: numba's thread pool is not fork-safe
    pool = ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(secret, task))
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    return pool.map(_encode_in_worker, chunks)


def _reset_outbox_folder(out: Path, overwrite: bool) -> None:
    """Create ``out`` (and ``out/local``), or empty it of a previous run's shards when allowed."""
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise OutboxError(f"{out} already holds an encrypted set ({MANIFEST_NAME}); "
                          "choose another --out or pass --overwrite")
    private_dir(out / LOCAL_DIR)  # file names and reasons: the owner's eyes only (0700, files 0600)
    for stale in list(out.glob("shard-*.tar")) + list(out.glob("shard-*.tar.partial")) + [out / MANIFEST_NAME]:
        stale.unlink(missing_ok=True)


class _Run:
    """The bookkeeping of one encrypt run: what was written, skipped, converted; counts per class."""

    def __init__(self, data: Path, out: Path, scan: Scan, task: Task, settings: EncryptSettings) -> None:
        self.data, self.out, self.settings = data, out, settings
        self.summary = EncryptSummary()
        self.bad = [{"file": rel, "reason": why} for rel, why in scan.skipped]  # files that could not be used
        self.duplicates: list[dict] = []
        self.converted: list[dict] = []
        self.seen: dict[str, str] = {}  # sample id -> first file with these exact bytes
        self.class_counts = [0] * len(task.classes)
        self.writer = ShardWriter(out, task.codec.suffix, settings.shard_images)
        self.tried = len(scan.skipped)

    def add(self, item: _Prepared, index) -> None:
        if item.encoded is None:
            self.bad.append({"file": item.relpath, "reason": item.reason})
            return
        if item.notes:
            self.converted.append({"file": item.relpath, "notes": list(item.notes)})
        sid = sample_id(item.encoded)
        if sid in self.seen:
            self.duplicates.append({"file": item.relpath, "reason": f"duplicate of {self.seen[sid]}"})
            return
        self.seen[sid] = item.relpath
        self.writer.add(sid, item.encoded, item.label)
        index.write(json.dumps({"id": sid, "file": item.relpath, "label": item.label}) + "\n")
        self.class_counts[item.label] += 1
        self.summary.images += 1
        self.summary.bytes_in += item.bytes_in
        self.summary.bytes_out += len(item.encoded)

    def check_bad_fraction(self) -> None:
        s = self.settings
        if self.tried >= s.min_files_before_abort and len(self.bad) > s.max_bad_fraction * self.tried:
            raise TooManyBadFiles(
                f"{len(self.bad)} of {self.tried} files could not be used (more than {s.max_bad_fraction:.0%}); "
                f"stopped. Is {self.data} the right folder? Reasons are in {self.out / LOCAL_DIR / 'report.json'}")

    def write_report(self, started: float) -> None:
        self.summary.skipped, self.summary.duplicates = len(self.bad), len(self.duplicates)
        self.summary.seconds = time.perf_counter() - started
        report = {"summary": asdict(self.summary), "skipped": self.bad + self.duplicates, "converted": self.converted}
        atomic_write(self.out / LOCAL_DIR / "report.json", (json.dumps(report, indent=1) + "\n").encode(), private=True)


def upload_key_id(task: Task, key: OwnerKey | None) -> str | None:
    """The key id an outbox and its upload carry: ``per-image`` (nobody's) for a task with a fresh key
    per image, the owner key's id otherwise, none for plain images."""
    if task.per_image_keys:
        return PER_IMAGE_KEY_ID
    return None if key is None else key.key_id


def encrypt_folder(
    data: Path, out: Path, key: OwnerKey | None, settings: EncryptSettings,
    overwrite: bool = False, progress: bool | None = None,
) -> EncryptSummary:
    """Encrypt (or, with ``key=None`` and scheme "plain", just prepare) ``data`` into ``out``."""
    scan = scan_image_folder(data, settings.task.classes if settings.task else None)
    task = settings.task or Task(scan.classes)
    if task.per_image_keys and key is not None:
        raise OwnerError("this task encrypts every image under its own fresh key (task.key_mode per-image); an "
                         "owner key is not used: pass none")
    if not task.per_image_keys and task.encrypted != (key is not None):
        raise OwnerError("a key is required unless the scheme is 'plain' (and refused with it)")
    out = Path(out)
    _reset_outbox_folder(out, overwrite)
    started = time.perf_counter()
    run = _Run(Path(data), out, scan, task, settings)
    bar = tqdm(total=len(scan.images), unit="img", desc="encrypt" if task.encrypted else "prepare",
               disable=progress is False or (progress is None and not sys.stderr.isatty()), file=sys.stderr)
    try:
        run.check_bad_fraction()
        with ExitStack() as stack:
            # sample id -> source file name (often a person's name): created 0600, never readable by others
            index_fd = os.open(out / LOCAL_DIR / "index.jsonl", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(index_fd, 0o600)
            index = stack.enter_context(open(index_fd, "w", encoding="utf-8"))
            for chunk in _prepared_chunks(scan.images, None if key is None else key.secret, task, settings, stack):
                for item in chunk:
                    run.add(item, index)
                run.tried += len(chunk)
                run.check_bad_fraction()
                bar.update(len(chunk))
        shards = run.writer.close()
        if run.summary.images == 0:
            raise TooManyBadFiles(f"no usable image in {data}; stopped. Reasons are in "
                                  f"{out / LOCAL_DIR / 'report.json'}")
    finally:
        bar.close()
        run.write_report(started)
    _write_manifest(out, key, task, settings.split, run, shards)
    return run.summary


def _write_manifest(out: Path, key: OwnerKey | None, task: Task, split: str, run: _Run, shards) -> None:
    """Written last: an outbox without a manifest is known to be incomplete."""
    Manifest(
        key_id=upload_key_id(task, key),
        scheme=task.scheme,
        image_size=task.image_size,
        block_size=task.block_size if task.encrypted else None,
        codec=asdict(task.codec),
        classes=list(task.classes),
        split=split,
        count=run.summary.images,
        class_counts=run.class_counts,
        shards=shards,
        producer=f"owner-agent {__version__}",
    ).write(out)
