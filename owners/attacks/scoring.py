"""Scoring an attack against the truth: how much of the schedule, how many images, how similar.

``recovered``: per component (position, orientation, negative-positive, channel order) the
fraction of output blocks where the estimate equals the true schedule, and ``key`` the fraction
where every component is right. Ciphertext-only attacks cannot tell an image from its mirror
image, so each figure is also given up to one whole-image left-right flip (the better of the
two readings, taken once for the whole key, never per block).

``exact``: the fraction of images whose decryption under the estimate is identical, pixel for
pixel, to their decryption under the true key (a block that is flat or symmetric decrypts the
same under several schedules, so this can exceed ``key``). SSIM and PSNR compare the attack's
reconstruction with the plain image the owner holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from owners.attacks.common import ScheduleCipher, mirrored
from owners.cipher import NUM_TRANSFORMS, BlockSchedule, CipherGeometry, transform_block


@dataclass(frozen=True)
class Score:
    key: float  # fraction of blocks with every component right (best of direct / mirrored reading)
    position: float
    orientation: float
    negate: float
    channels: float | None  # colour scheme only
    exact: float  # fraction of images decrypted exactly as the true key decrypts them
    exact_up_to_flip: float  # ... or as their mirror image (the same content, for a viewer)
    ssim: float  # mean over the scored images, reconstruction vs plain (mirrored plain if mirrored)
    psnr: float  # dB, mean over the scored images (likewise)
    mirrored: bool  # the key was recovered as the mirror image's key
    arrangement: float | None = None  # blocks in the right place up to one turn/flip of the whole
    # image (square grids): how much of the picture's layout is recovered when its orientation is not

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def component_agreement(estimate: BlockSchedule, truth: BlockSchedule) -> dict[str, float | None]:
    pos = estimate.source == truth.source
    ori = estimate.transform == truth.transform
    neg = estimate.negate == truth.negate
    both = pos & ori & neg
    ch = None
    if truth.channel_order is not None and estimate.channel_order is not None:
        ch_ok = estimate.channel_order == truth.channel_order
        both &= ch_ok
        ch = float(ch_ok.mean())
    return {"key": float(both.mean()), "position": float(pos.mean()), "orientation": float(ori.mean()),
            "negate": float(neg.mean()), "channels": ch}


def score_attack(estimate: BlockSchedule, truth: BlockSchedule, geometry: CipherGeometry,
                 encrypted: np.ndarray, plain: np.ndarray) -> Score:
    """Compare ``estimate`` with ``truth`` and decrypt ``encrypted`` (as stored) with both."""
    direct = component_agreement(estimate, truth)
    flipped = component_agreement(estimate, mirrored(truth, geometry))
    use_flip = flipped["key"] > direct["key"]
    parts = flipped if use_flip else direct
    guess = ScheduleCipher(estimate, geometry).decrypt(encrypted)
    reference = ScheduleCipher(truth, geometry).decrypt(encrypted)
    exact = _identical(guess, reference)
    flip_exact = exact | _identical(guess, reference[:, :, ::-1])
    target = plain[:, :, ::-1] if use_flip else plain
    return Score(parts["key"], parts["position"], parts["orientation"], parts["negate"], parts["channels"],
                 float(exact.mean()), float(flip_exact.mean()), float(ssim(guess, target).mean()),
                 float(psnr(guess, target).mean()), bool(use_flip), arrangement(estimate, truth, geometry))


def arrangement(estimate: BlockSchedule, truth: BlockSchedule, geometry: CipherGeometry) -> float | None:
    """Fraction of blocks placed right up to the best of the 8 turns/flips of the whole image
    (None where the block grid is not square: the gray scheme's three planes side by side)."""
    rows, cols = geometry.grid
    if rows != cols:
        return None
    grid = np.arange(rows * cols).reshape(rows, cols)
    best = 0.0
    for code in range(NUM_TRANSFORMS):
        new_position = np.argsort(transform_block(grid, code).reshape(-1))  # old position -> new position
        best = max(best, float(np.mean(new_position[truth.source] == estimate.source)))
    return best


def _identical(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.reshape(len(a), -1) == b.reshape(len(b), -1)).all(axis=1)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR per image in dB (capped at 100 for identical images)."""
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return np.where(err > 0, 10 * np.log10(255.0**2 / np.maximum(err, 1e-12)), 100.0)


def _gaussian(size: int, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(images: np.ndarray, window: np.ndarray) -> np.ndarray:
    view = np.lib.stride_tricks.sliding_window_view
    rows = view(images, len(window), axis=1) @ window
    return view(rows, len(window), axis=2) @ window


SSIM_BATCH = 32  # images per step: the float64 filter planes of large images add up


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> np.ndarray:
    """Mean SSIM per image (Wang et al. 2004) of uint8 (N, H, W, 3) batches: mean over channels,
    a 7-pixel Gaussian window (sigma 1.5), K1=0.01, K2=0.03, L=255."""
    if len(a) > SSIM_BATCH:
        return np.concatenate([ssim(a[i:i + SSIM_BATCH], b[i:i + SSIM_BATCH], window)
                               for i in range(0, len(a), SSIM_BATCH)])
    w = _gaussian(window)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = np.zeros(len(a))
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = _filter(x, w), _filter(y, w)
        vx, vy, cov = _filter(x * x, w) - mx**2, _filter(y * y, w) - my**2, _filter(x * y, w) - mx * my
        smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        out += smap.reshape(len(a), -1).mean(axis=1)
    return out / a.shape[-1]


MEAN_FIELDS = ("key", "position", "orientation", "negate", "channels", "exact", "exact_up_to_flip", "ssim", "psnr",
               "arrangement")


def mean_score(scores: list[Score]) -> Score:
    """One Score from per-image scores (each image scored on its own, e.g. against its own key):
    the mean of every figure; ``mirrored`` when most images were read as their mirror image."""
    def mean(name: str) -> float | None:
        values = [getattr(s, name) for s in scores]
        return None if any(v is None for v in values) else float(np.mean(values))
    return Score(**{k: mean(k) for k in MEAN_FIELDS}, mirrored=bool(np.mean([s.mirrored for s in scores]) > 0.5))
