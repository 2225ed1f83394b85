"""``owner-agent encrypt``: image folder -> encrypted WebDataset shards in an outbox.

Pipeline, in chunks of ``chunk`` images, one chunk per worker process at a time: load and fit
-> encrypt the whole chunk with one compiled gather -> encode; the parent appends the results to
shards in input order (so the output is the same for any number of workers). The outbox gets:

    OUT/shard-NNNNN.tar, OUT/manifest.json     what an upload sends (no file names, no metadata)
    OUT/local/report.json, OUT/local/index.jsonl   stays with the owner: skipped files and reasons,
                                                  conversions, sample id -> source file
The manifest is written last, so an outbox without one is known to be incomplete.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numba
import numpy as np
from tqdm import tqdm

from owners import __version__
from owners.cipher import BlockCipher, Geometry
from owners.images import BadImage, SourceImage, load_rgb, scan_image_folder
from owners.keys import OwnerKey
from owners.shards import MANIFEST_NAME, Codec, Manifest, ShardWriter, atomic_write, sample_id

LOCAL_DIR = "local"  # inside the outbox; never uploaded


@dataclass(frozen=True)
class EncryptSettings:
    image_size: int = 32  # pixels; images are resized (shorter side) and centre-cropped to this
    block_size: int = 16  # EtC block, pixels (colour: 16, gray: 8)
    scheme: str = "color"  # "color", "gray", or "plain" (no encryption, for baselines)
    codec: Codec = Codec()
    split: str = "train"  # "train" or "test": recorded in the manifest
    classes: tuple[str, ...] | None = None  # the task's class list; None: sorted folder names
    shard_images: int = 10_000  # samples per shard (~15 MB for 32x32 JPEG)
    chunk: int = 512  # images loaded, encrypted and encoded together
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


class TooManyBadFiles(RuntimeError):
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

    def __init__(self, secret: bytes | None, settings: EncryptSettings) -> None:
        self.settings = settings
        self.cipher = None
        if secret is not None:
            geometry = Geometry(settings.image_size, settings.image_size, settings.block_size, settings.scheme)
            self.cipher = BlockCipher(secret, geometry)

    def __call__(self, items: list[SourceImage]) -> list[_Prepared]:
        loaded = []
        for item in items:
            try:
                nbytes = item.path.stat().st_size
                arr, notes = load_rgb(item.path, self.settings.image_size)
                loaded.append((item, arr, None, tuple(notes), nbytes))
            except BadImage as exc:
                loaded.append((item, None, str(exc), (), 0))
            except OSError as exc:  # vanished or unreadable file
                loaded.append((item, None, f"cannot read: {exc.strerror or exc}", (), 0))
        good = [arr for _, arr, _, _, _ in loaded if arr is not None]
        stored = iter(())
        if good:
            batch = np.stack(good)
            stored = iter(batch if self.cipher is None else self.cipher.encrypt(batch))
        return [
            _Prepared(item.relpath, item.label, None if arr is None else self.settings.codec.encode(next(stored)),
                      reason, notes, nbytes)
            for item, arr, reason, notes, nbytes in loaded
        ]


_worker_encoder: _ChunkEncoder | None = None  # one per worker process


def _init_worker(secret: bytes | None, settings: EncryptSettings) -> None:
    global _worker_encoder
    numba.set_num_threads(1)  # the processes already use every core
    _worker_encoder = _ChunkEncoder(secret, settings)


def _encode_in_worker(items: list[SourceImage]) -> list[_Prepared]:
    assert _worker_encoder is not None
    return _worker_encoder(items)


def _prepared_chunks(items: list[SourceImage], secret: bytes | None, settings: EncryptSettings,
                     stack: ExitStack) -> Iterator[list[_Prepared]]:
    """Chunks of results in input order; worker processes when there is more than one chunk.

    The secret reaches the workers through the pool's pipe (pickled init arguments), never
    through argv, the environment or a file.
    """
    chunks = [items[i : i + settings.chunk] for i in range(0, len(items), settings.chunk)]
    if settings.workers <= 1 or len(chunks) <= 1:
        encoder = _ChunkEncoder(secret, settings)
        return (encoder(chunk) for chunk in chunks)
    # spawn, not fork: numba's thread pool is not fork-safe
    pool = ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(secret, settings))
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    return pool.map(_encode_in_worker, chunks)


def _prepare_outbox(out: Path, overwrite: bool) -> None:
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an encrypted set ({MANIFEST_NAME}); "
                              "choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCAL_DIR).mkdir(exist_ok=True)
    for stale in list(out.glob("shard-*.tar")) + list(out.glob("shard-*.tar.partial")) + [out / MANIFEST_NAME]:
        stale.unlink(missing_ok=True)


def encrypt_folder(
    data: Path, out: Path, key: OwnerKey | None, settings: EncryptSettings,
    overwrite: bool = False, progress: bool | None = None,
) -> EncryptSummary:
    """Encrypt (or, with ``key=None`` and scheme "plain", just prepare) ``data`` into ``out``."""
    plain = settings.scheme == "plain"
    if plain != (key is None):
        raise ValueError("a key is required unless the scheme is 'plain' (and refused with it)")
    if not plain:  # a bad geometry is an error before anything is written
        Geometry(settings.image_size, settings.image_size, settings.block_size, settings.scheme)
    scan = scan_image_folder(data, settings.classes)
    out = Path(out)
    _prepare_outbox(out, overwrite)

    started = time.perf_counter()
    summary = EncryptSummary()
    bad = [{"file": rel, "reason": why} for rel, why in scan.skipped]  # files that could not be used
    duplicates: list[dict] = []
    converted: list[dict] = []
    seen: dict[str, str] = {}
    class_counts = [0] * len(scan.classes)
    writer = ShardWriter(out, settings.codec.suffix, settings.shard_images)
    bar = tqdm(total=len(scan.images), unit="img", desc="encrypt" if not plain else "prepare",
               disable=progress is False or (progress is None and not sys.stderr.isatty()), file=sys.stderr)

    def check_bad_fraction(tried: int) -> None:
        if tried >= settings.min_files_before_abort and len(bad) > settings.max_bad_fraction * tried:
            raise TooManyBadFiles(
                f"{len(bad)} of {tried} files could not be used (more than "
                f"{settings.max_bad_fraction:.0%}); stopped. Is {data} the right folder? "
                f"Reasons are in {out / LOCAL_DIR / 'report.json'}"
            )

    try:
        check_bad_fraction(len(scan.skipped))
        with ExitStack() as stack:
            index = stack.enter_context(open(out / LOCAL_DIR / "index.jsonl", "w", encoding="utf-8"))
            tried = len(scan.skipped)
            for chunk in _prepared_chunks(scan.images, None if key is None else key.secret, settings, stack):
                for item in chunk:
                    if item.encoded is None:
                        bad.append({"file": item.relpath, "reason": item.reason})
                        continue
                    if item.notes:
                        converted.append({"file": item.relpath, "notes": list(item.notes)})
                    sid = sample_id(item.encoded)
                    if sid in seen:
                        duplicates.append({"file": item.relpath, "reason": f"duplicate of {seen[sid]}"})
                        continue
                    seen[sid] = item.relpath
                    writer.add(sid, item.encoded, item.label)
                    index.write(json.dumps({"id": sid, "file": item.relpath, "label": item.label}) + "\n")
                    class_counts[item.label] += 1
                    summary.images += 1
                    summary.bytes_in += item.bytes_in
                    summary.bytes_out += len(item.encoded)
                tried += len(chunk)
                check_bad_fraction(tried)
                bar.update(len(chunk))
        shards = writer.close()
        if summary.images == 0:
            raise TooManyBadFiles(f"no usable image in {data}; stopped. Reasons are in "
                                  f"{out / LOCAL_DIR / 'report.json'}")
    finally:
        bar.close()
        summary.skipped, summary.duplicates = len(bad), len(duplicates)
        summary.seconds = time.perf_counter() - started
        report = {"summary": asdict(summary), "skipped": bad + duplicates, "converted": converted}
        atomic_write(out / LOCAL_DIR / "report.json", (json.dumps(report, indent=1) + "\n").encode())

    manifest = Manifest(
        key_id=None if key is None else key.key_id,
        scheme=settings.scheme,
        image_size=settings.image_size,
        block_size=None if plain else settings.block_size,
        codec=asdict(settings.codec),
        classes=list(scan.classes),
        split=settings.split,
        count=summary.images,
        class_counts=class_counts,
        shards=shards,
        producer=f"owner-agent {__version__}",
    )
    manifest.write(out)
    return summary
