"""What every attack shares: the dihedral transform algebra, cipher planes, applying a schedule."""
from __future__ import annotations

import numpy as np

from owners.cipher import (
    CHANNEL_ORDERS,
    NUM_TRANSFORMS,
    BlockSchedule,
    CipherGeometry,
    encrypt_reference,
    rgb_to_stacked_ycbcr,
    split_blocks,
    stacked_ycbcr_to_rgb,
    transform_block,
)

_PROBE = np.arange(9).reshape(3, 3)  # no symmetry: each of the 8 transforms moves it differently


def _code_of(arr: np.ndarray) -> int:
    for code in range(NUM_TRANSFORMS):
        if np.array_equal(transform_block(_PROBE, code), arr):
            return code
    raise AssertionError("not a dihedral transform of the probe")


def _compose_table() -> np.ndarray:
    """COMPOSE[a, b]: the code of 'apply b, then a'."""
    table = np.zeros((NUM_TRANSFORMS, NUM_TRANSFORMS), np.int64)
    for a in range(NUM_TRANSFORMS):
        for b in range(NUM_TRANSFORMS):
            table[a, b] = _code_of(transform_block(transform_block(_PROBE, b), a))
    return table


COMPOSE = _compose_table()
INVERSE = np.array([int(np.argmax(COMPOSE[:, t] == 0)) for t in range(NUM_TRANSFORMS)])
FLIP_LR = 4  # transform code of a left-right flip
ORDER_INVERSE = np.array([CHANNEL_ORDERS.index(tuple(int(i) for i in np.argsort(o))) for o in CHANNEL_ORDERS])


def plain_planes(images: np.ndarray, geometry: CipherGeometry) -> np.ndarray:
    """RGB (N, H, W, 3) -> the planes the block steps act on, (N, rows, cols, C)."""
    if geometry.scheme == "color":
        return images
    return rgb_to_stacked_ycbcr(images)[..., None]


def cipher_planes(encrypted: np.ndarray) -> np.ndarray:
    """Encrypted images as stored ((N, H, W, 3) colour, (N, H, 3W) gray) -> (N, rows, cols, C)."""
    return encrypted if encrypted.ndim == 4 else encrypted[..., None]


def blocks_of(planes: np.ndarray, block: int) -> np.ndarray:
    """(N, rows, cols, C) -> (N, num_blocks, block, block, C)."""
    return np.stack([split_blocks(p, block) for p in planes]) if len(planes) else np.empty((0,))


def make_schedule(source, transform, negate, channel_order) -> BlockSchedule:
    order = None if channel_order is None else np.asarray(channel_order, np.int64)
    return BlockSchedule(np.asarray(source, np.int64), np.asarray(transform, np.int64), np.asarray(negate, bool), order)


class ScheduleCipher:
    """A schedule (true or estimated) compiled like :class:`owners.cipher.BlockCipher`, in numpy."""

    def __init__(self, schedule: BlockSchedule, geometry: CipherGeometry) -> None:
        self.geometry = geometry
        self.schedule = schedule
        shape = geometry.plane_shape
        size = int(np.prod(shape))
        trace = encrypt_reference(np.arange(size, dtype=np.int64).reshape(shape), schedule, geometry.block,
                                  negate=False).reshape(-1)
        ones = encrypt_reference(np.zeros(shape, np.uint8), schedule, geometry.block).reshape(-1)
        self._dec_index = np.argsort(trace)
        self._dec_mask = ones[self._dec_index]

    def decrypt_planes(self, encrypted: np.ndarray) -> np.ndarray:
        """Encrypted images as stored -> plain planes (N, rows, cols, C)."""
        flat = cipher_planes(encrypted).reshape(len(encrypted), -1)
        return (flat[:, self._dec_index] ^ self._dec_mask).reshape((len(encrypted),) + self.geometry.plane_shape)

    def decrypt(self, encrypted: np.ndarray) -> np.ndarray:
        """Encrypted images as stored -> RGB (N, H, W, 3)."""
        planes = self.decrypt_planes(encrypted)
        return planes if self.geometry.scheme == "color" else stacked_ycbcr_to_rgb(planes[..., 0])


def mirrored(schedule: BlockSchedule, geometry: CipherGeometry) -> BlockSchedule:
    """The schedule that maps the left-right mirrored plain image to the same ciphertext.

    A ciphertext-only attack cannot tell an image from its mirror image (natural images look
    natural both ways), so attacks are scored 'up to one whole-image flip' as well. In the gray
    scheme each of the Y, Cb and Cr planes is mirrored within itself.
    """
    g = geometry
    rows, cols = g.grid
    width_blocks = g.width // g.block  # blocks per row of one plane (gray: each of three planes)
    r, c = np.divmod(np.asarray(schedule.source), cols)
    plane, inner = np.divmod(c, width_blocks)
    mirror = r * cols + plane * width_blocks + (width_blocks - 1 - inner)
    transform = COMPOSE[np.asarray(schedule.transform), FLIP_LR]
    return make_schedule(mirror, transform, schedule.negate, schedule.channel_order)


ALIGN_ROUNDS = 4  # consensus rounds when aligning blocks to each other


def standardised(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance along axis 0 (the images)."""
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
