"""``owner-agent preview``: one PNG showing what the cloud will see (plain | encrypted | decrypted)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from owners.cipher import BlockCipher, CipherGeometry
from owners.errors import OwnerError
from owners.images import BadImage, load_rgb, scan_image_folder
from owners.keys import OwnerKey
from protocol.codec import Codec, decode

PREVIEW_MIN_TILE = 128  # pixels; small images are enlarged (nearest neighbour) to be seen


def make_preview(data: Path, out: Path, key: OwnerKey, geometry: CipherGeometry, codec: Codec,
                 count: int = 8) -> int:
    """One PNG, a row per image: plain | encrypted as uploaded | decrypted from the upload."""
    scan = scan_image_folder(data)
    step = max(1, len(scan.images) // count)  # spread the picks over the classes
    picked = []
    for item in scan.images[::step]:
        try:
            picked.append(load_rgb(item.path, geometry.height)[0])
        except (BadImage, OSError):  # a preview just skips what it cannot show
            continue
        if len(picked) == count:
            break
    if not picked:
        raise OwnerError(f"no readable image found in {data}")
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
