"""``owner-agent decrypt``: shards back into plain images, with the owner's key (checks it is the right one)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from owners.cipher import BlockCipher, CipherGeometry
from owners.errors import OutboxError
from owners.keys import OwnerKey
from protocol.codec import decode
from protocol.shards import Manifest, iter_samples, verify_shards


def cipher_for(manifest: Manifest, key: OwnerKey | None) -> BlockCipher | None:
    """The cipher that produced these shards, after checking the key is the right one."""
    if manifest.scheme == "plain":
        return None
    if key is None:
        raise OutboxError("these shards are encrypted: a key is required")
    if key.key_id != manifest.key_id:
        raise OutboxError(
            f"these shards were encrypted with key id {manifest.key_id}; "
            f"key {key.name!r} has id {key.key_id}"
        )
    size = manifest.image_size
    return BlockCipher(key.secret, CipherGeometry(size, size, manifest.block_size, manifest.scheme))


def _inside(out: Path, *parts: str) -> Path:
    """``out/parts...``, refusing any path that would land outside ``out`` (a link, an odd name)."""
    target = out.joinpath(*parts)
    if not target.resolve().is_relative_to(out.resolve()):
        raise OutboxError(f"refusing to write {target}: it is outside {out}")
    return target


def decrypt_folder(shards: Path, out: Path, key: OwnerKey | None, chunk: int = 512) -> int:
    """Write ``out/<class>/<id>.png`` for every sample; returns the number of images."""
    manifest = Manifest.load(shards)
    verify_shards(shards, manifest)
    cipher = cipher_for(manifest, key)
    for name in manifest.classes:
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
    written = 0

    def flush(batch: list[tuple[str, np.ndarray, int]]) -> None:
        arrays = np.stack([a for _, a, _ in batch])
        plain = arrays if cipher is None else cipher.decrypt(arrays)
        for (sid, _, label), img in zip(batch, plain):
            Image.fromarray(img).save(_inside(Path(out), manifest.classes[label], f"{sid}.png"))

    for shard in manifest.shards:
        batch: list[tuple[str, np.ndarray, int]] = []
        for sid, data, label in iter_samples(Path(shards) / shard.name):
            if label >= len(manifest.classes):
                raise OutboxError(f"{shard.name}: sample {sid} has label {label}; the manifest has "
                                  f"{len(manifest.classes)} classes")
            batch.append((sid, decode(data), label))
            if len(batch) == chunk:
                flush(batch)
                written += len(batch)
                batch = []
        if batch:
            flush(batch)
            written += len(batch)
    return written
