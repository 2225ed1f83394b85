"""Block-wise Encryption-then-Compression (EtC): colour and grayscale-based schemes.

The image is cut into M x M blocks, numbered row-major, and four key-driven steps are applied
(``docs/design.md`` gives the exact definition). Every step is indexed by the *output* block position:

1. block scrambling:   output block i is input block ``source[i]``;
2. rotation and flip:  code t in 0..7, rotate (t mod 4) quarter turns counter-clockwise
                       (numpy's rot90), then flip left-right when t >= 4;
3. negative-positive:  when ``negate[i]``, every byte of the block becomes p XOR 255;
4. colour shuffle:     output channel c is input channel ``CHANNEL_ORDERS[order[i]][c]``
                       (a true permutation: no channel is ever duplicated).

Colour EtC works on the RGB image (M = 16: one JPEG 4:2:0 MCU per block). Grayscale-based EtC
(Chuman et al. 2019) converts to YCbCr, stacks the three planes side by side into one
H x 3W grey image (the *cipher plane*) and applies steps 1-3 with M = 8.

Steps 1, 2 and 4 only move bytes and step 3 is an XOR with 255 on whole blocks, so for a given
key and geometry the whole cipher compiles into one gather index G and one XOR mask m:
``enc = plane.reshape(N, -1)[:, G] ^ m``. :func:`encrypt_reference` is the readable per-block
definition; :class:`BlockCipher` traces an index image through it once and then applies the
result to whole batches with a compiled, multi-threaded gather.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from owners.errors import OwnerError
from owners.keys import KeyStream
from protocol.privacy import privacy_verdict as shared_verdict
from protocol.task import ENCRYPTED_SCHEMES, Task

SCHEMES = ENCRYPTED_SCHEMES
# The 6 orders of (R, G, B); output channel c takes input channel order[c].
CHANNEL_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
NUM_TRANSFORMS = 8  # 4 rotations x {no flip, flip}
SCHEDULE_VERSION = "v1"  # part of every key-stream label: changing the derivation bumps it


class GeometryError(OwnerError, ValueError):
    """Image size, block size or scheme do not fit together."""


@dataclass(frozen=True)
class CipherGeometry:
    """What a key is compiled for: image size (pixels), block size (pixels), scheme."""

    height: int
    width: int
    block: int
    scheme: str  # "color" or "gray"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise GeometryError(f"unknown scheme {self.scheme!r}: choose one of {SCHEMES}")
        if self.block < 1:
            raise GeometryError(f"block size must be positive, got {self.block}")
        for name, size in (("height", self.height), ("width", self.width)):
            if size < self.block or size % self.block:
                raise GeometryError(
                    f"image {name} {size} is not a multiple of the block size {self.block}"
                )

    @classmethod
    def for_task(cls, task: Task) -> CipherGeometry:
        """The cipher geometry of an encrypted task (square images)."""
        return cls(task.image_size, task.image_size, task.block_size, task.scheme)

    @property
    def plane_shape(self) -> tuple[int, int, int]:
        """Shape (rows, columns, channels) of the image the block steps act on."""
        if self.scheme == "color":
            return (self.height, self.width, 3)
        return (self.height, 3 * self.width, 1)

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols, _ = self.plane_shape
        return rows // self.block, cols // self.block

    @property
    def num_blocks(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def key_space_bits(self) -> float:
        """log2 of the number of block schedules: n! * 8^n * 2^n * 6^n (colour), n! * 8^n * 2^n (gray).

        An upper bound on brute-force work only: the schedule is separable per block and pooled
        statistics over one owner's images reveal it far faster (``docs/design.md``, section 6).
        """
        n = self.num_blocks
        per_block = NUM_TRANSFORMS * 2 * (len(CHANNEL_ORDERS) if self.scheme == "color" else 1)
        return math.lgamma(n + 1) / math.log(2) + n * math.log2(per_block)


WARN_BELOW_BITS = 128  # a key space below this gets a warning on every use


ACCEPT_FLAG = "--accept-cloud-can-decrypt"


class CloudCanDecrypt(OwnerError):
    """The privacy verdict on these settings is ``broken`` and the owner did not pass ACCEPT_FLAG."""


def privacy_verdict(geometry: CipherGeometry, key_mode: str = "owner") -> tuple[str, str]:
    """The audit's verdict for a geometry and key mode and why, in one sentence with the measured
    numbers; the same words everywhere the verdict is shown (``protocol/privacy.py``)."""
    g = geometry
    return shared_verdict(g.scheme, g.height, g.width, g.block, key_mode)


def privacy_gate(geometry: CipherGeometry, key_mode: str, accept_cloud_can_decrypt: bool, log) -> str:
    """Show the verdict before anything is written or sent for the cloud; refuse ``broken`` unless the
    owner accepted it for this command. Returns the verdict.

    ``broken`` is refused, not just shown: the owner's one reason to upload to an untrusted cloud is
    that the cloud cannot see the images, and for these settings a measured attack (or one assumed to
    succeed) shows that it can. The flag names that risk, so passing it is a decision, not a habit.
    """
    verdict, text = privacy_verdict(geometry, key_mode)
    if verdict == "broken" and not accept_cloud_can_decrypt:
        raise CloudCanDecrypt(f"{text}. Refused: nothing was written or sent. Pass {ACCEPT_FLAG} to accept that a "
                              "cloud running these attacks can see your images")
    if verdict == "broken":
        log(f"{text}. Accepted for this command with {ACCEPT_FLAG}")
    elif verdict == "weak":
        log(f"warning: {text}")
    else:
        log(text)
    return verdict


@dataclass(frozen=True)
class BlockSchedule:
    """The per-block choices a key makes for one geometry (all indexed by output position)."""

    source: np.ndarray  # int, output block i is input block source[i]
    transform: np.ndarray  # int in 0..7
    negate: np.ndarray  # bool
    channel_order: np.ndarray | None  # int in 0..5 (colour scheme only)


def _label(geometry: CipherGeometry, step: str) -> str:
    g = geometry
    return f"etc/{SCHEDULE_VERSION}/{g.scheme}/{g.height}x{g.width}/block{g.block}/{step}"


def derive_schedule(secret: bytes, geometry: CipherGeometry) -> BlockSchedule:
    """Derive the block schedule from the secret with an HMAC counter stream (stable forever)."""
    n = geometry.num_blocks

    def draws(step: str, k: int) -> np.ndarray:
        stream = KeyStream(secret, _label(geometry, step))
        return np.array([stream.below(k) for _ in range(n)], dtype=np.int64)

    source = np.array(KeyStream(secret, _label(geometry, "scramble")).permutation(n))
    schedule = BlockSchedule(
        source=source,
        transform=draws("transform", NUM_TRANSFORMS),
        negate=draws("negate", 2).astype(bool),
        channel_order=draws("channels", len(CHANNEL_ORDERS)) if geometry.scheme == "color" else None,
    )
    for arr in (schedule.source, schedule.transform, schedule.negate, schedule.channel_order):
        if arr is not None:
            arr.setflags(write=False)
    return schedule


# --------------------------------------------------------------------------- the definition


def split_blocks(plane: np.ndarray, block: int) -> np.ndarray:
    """(rows, cols, C) -> (num_blocks, block, block, C), blocks in row-major order."""
    rows, cols, ch = plane.shape
    grid = plane.reshape(rows // block, block, cols // block, block, ch)
    return grid.transpose(0, 2, 1, 3, 4).reshape(-1, block, block, ch)


def merge_blocks(blocks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`split_blocks`."""
    n, block, _, ch = blocks.shape
    rows, cols = grid
    merged = blocks.reshape(rows, cols, block, block, ch).transpose(0, 2, 1, 3, 4)
    return merged.reshape(rows * block, cols * block, ch)


def transform_block(block: np.ndarray, code: int) -> np.ndarray:
    """Rotate (code mod 4) quarter turns counter-clockwise, then flip left-right if code >= 4."""
    out = np.rot90(block, k=code % 4, axes=(0, 1))
    return out[:, ::-1] if code >= 4 else out


def encrypt_reference(
    plane: np.ndarray, schedule: BlockSchedule, block: int, negate: bool = True
) -> np.ndarray:
    """Per-block EtC of one cipher plane (rows, cols, C). Readable and slow: the definition.

    ``negate=False`` skips step 3; used to trace an index image, which must not be XORed.
    """
    blocks = split_blocks(plane, block)
    out = np.empty_like(blocks)
    for i in range(len(blocks)):
        b = blocks[schedule.source[i]]  # step 1
        b = transform_block(b, int(schedule.transform[i]))  # step 2
        if negate and schedule.negate[i]:
            b = b ^ np.uint8(255)  # step 3
        if schedule.channel_order is not None:
            b = b[:, :, CHANNEL_ORDERS[schedule.channel_order[i]]]  # step 4
        out[i] = b
    rows, cols, _ = plane.shape
    return merge_blocks(out, (rows // block, cols // block))


# --------------------------------------------------------------------------- YCbCr planes
# JPEG/JFIF full-range BT.601 in libjpeg's 16-bit fixed point: integer arithmetic, so the grey
# plane is bit-identical on every machine (no float rounding differences).


@numba.njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _ycbcr_planes(rgb: np.ndarray, height: np.uint64, width: np.uint64, out: np.ndarray) -> None:
    """rgb: N*H*W*3 bytes (flat) -> out: N*H*3W bytes, each row holding its Y, Cb, Cr rows."""
    rows = rgb.shape[0] // (width * np.uint64(3))
    for line in numba.prange(rows):  # image rows of the whole batch
        src = line * width * np.uint64(3)
        for col in range(width):
            r = np.int64(rgb[src + np.uint64(3) * col])
            g = np.int64(rgb[src + np.uint64(3) * col + np.uint64(1)])
            b = np.int64(rgb[src + np.uint64(3) * col + np.uint64(2)])
            o = src + col
            out[o] = (19595 * r + 38470 * g + 7471 * b + 32768) >> 16
            out[o + width] = (-11059 * r - 21709 * g + 32768 * b + 8421375) >> 16
            out[o + np.uint64(2) * width] = (32768 * r - 27439 * g - 5329 * b + 8421375) >> 16


@numba.njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _rgb_from_planes(planes: np.ndarray, height: np.uint64, width: np.uint64, out: np.ndarray) -> None:
    """Inverse of :func:`_ycbcr_planes` (exact up to the rounding of the forward conversion)."""
    rows = planes.shape[0] // (width * np.uint64(3))
    for line in numba.prange(rows):
        base = line * width * np.uint64(3)
        for col in range(width):
            i = base + col
            y = np.int64(planes[i])
            cb = np.int64(planes[i + width]) - 128
            cr = np.int64(planes[i + np.uint64(2) * width]) - 128
            o = base + np.uint64(3) * col
            out[o] = min(255, max(0, y + ((91881 * cr + 32768) >> 16)))
            out[o + np.uint64(1)] = min(255, max(0, y + ((-22554 * cb - 46802 * cr + 32768) >> 16)))
            out[o + np.uint64(2)] = min(255, max(0, y + ((116130 * cb + 32768) >> 16)))


def rgb_to_stacked_ycbcr(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) RGB -> (N, H, 3W) grey: the Y, Cb and Cr planes side by side."""
    n, h, w, _ = images.shape
    out = np.empty((n, h, 3 * w), np.uint8)
    _ycbcr_planes(np.ascontiguousarray(images).reshape(-1), np.uint64(h), np.uint64(w), out.reshape(-1))
    return out


def stacked_ycbcr_to_rgb(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_stacked_ycbcr` (exact up to rounding)."""
    n, h, w3 = planes.shape
    out = np.empty((n, h, w3 // 3, 3), np.uint8)
    _rgb_from_planes(np.ascontiguousarray(planes).reshape(-1), np.uint64(h), np.uint64(w3 // 3),
                     out.reshape(-1))
    return out


# --------------------------------------------------------------------------- compiled cipher


@numba.njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _gather_xor(src: np.ndarray, index: np.ndarray, mask: np.ndarray, out: np.ndarray, size: np.uint64) -> None:
    """out[n*size + j] = src[n*size + index[j]] ^ mask[j] for every image n.

    Flat arrays and unsigned indices on purpose: numba then emits no negative-index wraparound
    code (2.5x faster). Four images share each index load (another 1.4x on small images);
    groups of four are spread over the cores.
    """
    count = src.shape[0] // size
    for group in numba.prange((count + 3) // 4):
        first = np.uint64(4 * group)
        if first + 4 <= count:
            b0 = first * size
            b1 = b0 + size
            b2 = b1 + size
            b3 = b2 + size
            for j in range(size):
                g = index[j]
                k = mask[j]
                out[b0 + j] = src[b0 + g] ^ k
                out[b1 + j] = src[b1 + g] ^ k
                out[b2 + j] = src[b2 + g] ^ k
                out[b3 + j] = src[b3 + g] ^ k
        else:
            for n in range(first, count):
                base = n * size
                for j in range(size):
                    out[base + j] = src[base + index[j]] ^ mask[j]


def _apply(flat_index: np.ndarray, mask: np.ndarray, batch: np.ndarray) -> np.ndarray:
    src = np.ascontiguousarray(batch).reshape(-1)
    out = np.empty_like(src)
    if len(src):
        _gather_xor(src, flat_index, mask, out, np.uint64(len(flat_index)))
    return out


class BlockCipher:
    """A key compiled for one geometry; encrypts and decrypts whole batches.

    ``encrypt`` takes RGB images (N, H, W, 3) uint8 and returns new cipher planes: colour
    (N, H, W, 3), gray (N, H, 3W). ``decrypt`` is the exact inverse (gray: up to the YCbCr
    rounding).
    """

    def __init__(self, secret: bytes, geometry: CipherGeometry) -> None:
        self.geometry = geometry
        self.schedule = derive_schedule(secret, geometry)
        shape = geometry.plane_shape
        size = int(np.prod(shape))
        trace = encrypt_reference(
            np.arange(size, dtype=np.int64).reshape(shape), self.schedule, geometry.block,
            negate=False,
        )
        self._enc_index = trace.reshape(-1).astype(np.uint32)
        negated_blocks = np.where(self.schedule.negate, 255, 0).astype(np.uint8)
        block_mask = np.broadcast_to(
            negated_blocks[:, None, None, None], (geometry.num_blocks, geometry.block, geometry.block, shape[2])
        )
        self._enc_mask = merge_blocks(np.ascontiguousarray(block_mask), geometry.grid).reshape(-1)
        self._dec_index = np.argsort(self._enc_index).astype(np.uint32)
        self._dec_mask = np.ascontiguousarray(self._enc_mask[self._dec_index])

    def _check(self, images: np.ndarray, shape: tuple[int, ...], what: str) -> None:
        if images.dtype != np.uint8 or images.ndim != len(shape) + 1 or images.shape[1:] != shape:
            raise GeometryError(
                f"{what}: expected uint8 batch of shape (N, {', '.join(map(str, shape))}), "
                f"got {images.dtype} {images.shape}"
            )

    def encrypt(self, images: np.ndarray) -> np.ndarray:
        g = self.geometry
        self._check(images, (g.height, g.width, 3), "encrypt")
        planes = images if g.scheme == "color" else rgb_to_stacked_ycbcr(images)
        out = _apply(self._enc_index, self._enc_mask, planes)
        return out.reshape((len(images),) + self.cipher_image_shape)

    def decrypt(self, encrypted: np.ndarray) -> np.ndarray:
        g = self.geometry
        self._check(encrypted, self.cipher_image_shape, "decrypt")
        flat = _apply(self._dec_index, self._dec_mask, encrypted)
        if g.scheme == "color":
            return flat.reshape(len(encrypted), g.height, g.width, 3)
        return stacked_ycbcr_to_rgb(flat.reshape(len(encrypted), g.height, 3 * g.width))

    @property
    def cipher_image_shape(self) -> tuple[int, ...]:
        """Shape of one encrypted image as stored: (H, W, 3) colour, (H, 3W) grey."""
        rows, cols, ch = self.geometry.plane_shape
        return (rows, cols, 3) if ch == 3 else (rows, cols)
