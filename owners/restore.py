"""``owner-agent decrypt`` and ``owner-agent preview``: look at what the cloud will see."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from owners.cipher import BlockCipher, Geometry
from owners.images import load_rgb, scan_image_folder
from owners.keys import OwnerKey
from owners.shards import Codec, Manifest, decode, iter_samples, verify_shards

PREVIEW_MIN_TILE = 128  # pixels; small images are enlarged (nearest neighbour) to be seen


def cipher_for(manifest: Manifest, key: OwnerKey | None) -> BlockCipher | None:
    """The cipher that produced these shards, after checking the key is the right one."""
    if manifest.scheme == "plain":
        return None
    if key is None:
        raise ValueError("these shards are encrypted: a key is required")
    if key.key_id != manifest.key_id:
        raise ValueError(
            f"these shards were encrypted with key id {manifest.key_id}; "
            f"key {key.name!r} has id {key.key_id}"
        )
    size = manifest.image_size
    return BlockCipher(key.secret, Geometry(size, size, manifest.block_size, manifest.scheme))


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
            Image.fromarray(img).save(Path(out) / manifest.classes[label] / f"{sid}.png")

    for shard in manifest.shards:
        batch: list[tuple[str, np.ndarray, int]] = []
        for sid, data, label in iter_samples(Path(shards) / shard.name):
            batch.append((sid, decode(data), label))
            if len(batch) == chunk:
                flush(batch)
                written += len(batch)
                batch = []
        if batch:
            flush(batch)
            written += len(batch)
    return written


def make_preview(data: Path, out: Path, key: OwnerKey, geometry: Geometry, codec: Codec,
                 count: int = 8) -> int:
    """One PNG, a row per image: plain | encrypted as uploaded | decrypted from the upload."""
    scan = scan_image_folder(data)
    step = max(1, len(scan.images) // count)  # spread the picks over the classes
    picked = []
    for item in scan.images[::step]:
        try:
            picked.append(load_rgb(item.path, geometry.height)[0])
        except Exception:  # noqa: BLE001 - a preview just skips what it cannot show
            continue
        if len(picked) == count:
            break
    if not picked:
        raise ValueError(f"no readable image found in {data}")
    cipher = BlockCipher(key.secret, geometry)
    plain = np.stack(picked)
    stored = np.stack([decode(codec.encode(e)) for e in cipher.encrypt(plain)])
    restored = cipher.decrypt(stored)
    scale = max(1, PREVIEW_MIN_TILE // geometry.height)
    tiles = []
    for p, s, r in zip(plain, stored, restored):
        shown = s if s.ndim == 3 else np.repeat(s[:, :, None], 3, axis=2)
        tiles.append(np.concatenate([p, _gap(p), shown, _gap(p), r], axis=1))
    grid = np.concatenate([np.concatenate([t, _gap(t, horizontal=True)], axis=0) for t in tiles], axis=0)
    img = Image.fromarray(grid)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(out)
    return len(picked)


def _gap(tile: np.ndarray, horizontal: bool = False, px: int = 2) -> np.ndarray:
    shape = (px, tile.shape[1], 3) if horizontal else (tile.shape[0], px, 3)
    return np.full(shape, 255, np.uint8)
