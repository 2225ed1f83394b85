"""``owner-agent encrypt``: image folder -> encrypted WebDataset shards in an outbox.

Pipeline, in chunks of ``chunk`` images: load and fit (threads) -> encrypt the whole chunk with
one compiled gather -> encode (threads) -> append to shards in input order. The outbox gets:

    OUT/shard-NNNNN.tar, OUT/manifest.json     what an upload sends (no file names, no metadata)
    OUT/local/report.json, OUT/local/index.jsonl   stays with the owner: skipped files and reasons,
                                                  conversions, sample id -> source file
The manifest is written last, so an outbox without one is known to be incomplete.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

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
    workers: int = max(1, os.cpu_count() or 1)  # threads for decoding and encoding


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


def _load(item: SourceImage, size: int) -> tuple[np.ndarray | None, list[str], str | None, int]:
    try:
        nbytes = item.path.stat().st_size
        arr, notes = load_rgb(item.path, size)
        return arr, notes, None, nbytes
    except BadImage as exc:
        return None, [], str(exc), 0
    except OSError as exc:  # vanished or unreadable file
        return None, [], f"cannot read: {exc.strerror or exc}", 0


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
    cipher = None
    if not plain:
        assert key is not None
        geometry = Geometry(settings.image_size, settings.image_size, settings.block_size, settings.scheme)
        cipher = BlockCipher(key.secret, geometry)
    scan = scan_image_folder(data, settings.classes)
    out = Path(out)
    _prepare_outbox(out, overwrite)

    started = time.perf_counter()
    summary = EncryptSummary(skipped=len(scan.skipped))
    skipped = [{"file": rel, "reason": why} for rel, why in scan.skipped]
    converted: list[dict] = []
    seen: dict[str, str] = {}
    class_counts = [0] * len(scan.classes)
    writer = ShardWriter(out, settings.codec.suffix, settings.shard_images)
    index_path = out / LOCAL_DIR / "index.jsonl"
    bar = tqdm(total=len(scan.images), unit="img", desc="encrypt" if not plain else "prepare",
               disable=progress is False or (progress is None and not sys.stderr.isatty()), file=sys.stderr)

    def check_bad_fraction(tried: int) -> None:
        if tried >= settings.min_files_before_abort and len(skipped) > settings.max_bad_fraction * tried:
            raise TooManyBadFiles(
                f"{len(skipped)} of {tried} files could not be used (more than "
                f"{settings.max_bad_fraction:.0%}); stopped. Is {data} the right folder? "
                f"Reasons are in {out / LOCAL_DIR / 'report.json'}"
            )

    try:
        check_bad_fraction(len(scan.skipped))
        with ThreadPoolExecutor(settings.workers) as pool, open(index_path, "w", encoding="utf-8") as index:
            for start in range(0, len(scan.images), settings.chunk):
                items = scan.images[start : start + settings.chunk]
                loaded = list(pool.map(lambda it: _load(it, settings.image_size), items))
                good = []
                for item, (arr, notes, reason, nbytes) in zip(items, loaded):
                    if reason is not None:
                        skipped.append({"file": item.relpath, "reason": reason})
                        continue
                    if notes:
                        converted.append({"file": item.relpath, "notes": notes})
                    summary.bytes_in += nbytes
                    good.append((item, arr))
                check_bad_fraction(start + len(items) + len(scan.skipped))
                if good:
                    batch = np.stack([arr for _, arr in good])
                    stored = batch if cipher is None else cipher.encrypt(batch)
                    encoded = list(pool.map(settings.codec.encode, stored))
                    for (item, _), data_bytes in zip(good, encoded):
                        sid = sample_id(data_bytes)
                        if sid in seen:
                            summary.duplicates += 1
                            skipped.append({"file": item.relpath, "reason": f"duplicate of {seen[sid]}"})
                            continue
                        seen[sid] = item.relpath
                        writer.add(sid, data_bytes, item.label)
                        index.write(json.dumps({"id": sid, "file": item.relpath, "label": item.label}) + "\n")
                        class_counts[item.label] += 1
                        summary.images += 1
                        summary.bytes_out += len(data_bytes)
                bar.update(len(items))
        shards = writer.close()
        if summary.images == 0:
            raise TooManyBadFiles(f"no usable image in {data}; stopped. Reasons are in "
                                  f"{out / LOCAL_DIR / 'report.json'}")
    finally:
        bar.close()
        summary.skipped = len(skipped) - summary.duplicates
        summary.seconds = time.perf_counter() - started
        report = {"summary": asdict(summary), "skipped": skipped, "converted": converted}
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
