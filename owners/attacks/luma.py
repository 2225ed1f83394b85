"""The gray scheme's reconstruction as a viewer sees it in its luma plane alone.

A reconstruction whose Y plane is right shows the picture in grey, a privacy loss even where its
Cb and Cr planes are wrong; SSIM on RGB (:mod:`owners.attacks.scoring`) mixes those wrong colours
in, and the layout figure there needs a square block grid (the gray cipher plane's three planes
side by side are not). These score the Y plane alone, each the best over the whole picture's 8
turns and flips (and, for SSIM, its negative): a viewer recognises a turned, mirrored or negated
grey picture, and the gray cipher negates blocks, so one image alone cannot tell the cloud which
reading is upright. A random key's best reading scores about 0.18 on CIFAR-10 32x32 (40 images).
"""
from __future__ import annotations

import numpy as np

from owners.attacks.common import ScheduleCipher
from owners.attacks.scoring import ssim
from owners.cipher import NUM_TRANSFORMS, BlockSchedule, CipherGeometry, rgb_to_stacked_ycbcr, transform_block


def luma_arrangement(estimate: BlockSchedule, truth: BlockSchedule, geometry: CipherGeometry) -> float | None:
    """Fraction of the Y plane's blocks the estimate puts in the Y plane at their place, up to the best
    of the 8 turns/flips of the whole image (None where the plane's block grid is not square)."""
    rows, cols = geometry.height // geometry.block, geometry.width // geometry.block
    if rows != cols:
        return None
    per_row = 3 * cols
    true_r, true_c = np.divmod(np.asarray(truth.source), per_row)
    est_r, est_c = np.divmod(np.asarray(estimate.source), per_row)
    luma = true_c < cols  # output blocks whose plain block is in the Y plane
    in_luma = est_c[luma] < cols
    estimated = est_r[luma] * cols + est_c[luma]
    grid = np.arange(rows * cols).reshape(rows, cols)
    best = 0.0
    for code in range(NUM_TRANSFORMS):
        new_position = np.argsort(transform_block(grid, code).reshape(-1))  # old position -> new position
        moved = new_position[true_r[luma] * cols + true_c[luma]]
        best = max(best, float(np.mean(in_luma & (moved == estimated))))
    return best


def luma_ssim(estimate: BlockSchedule, geometry: CipherGeometry, encrypted: np.ndarray,
              plain: np.ndarray) -> np.ndarray:
    """Per image, SSIM of the estimate's Y plane against the plain image's best reading: any of its 8
    turns and flips, as it is or negated."""
    width = geometry.width
    guess = ScheduleCipher(estimate, geometry).decrypt_planes(encrypted)[..., :width, :]
    target = rgb_to_stacked_ycbcr(plain)[..., :width, None]
    turns = [np.rot90(target, k=code % 4, axes=(1, 2)) for code in range(4)]
    readings = [r for turned in turns for flipped in (turned, turned[:, :, ::-1]) for r in (flipped, 255.0 - flipped)]
    return np.max([ssim(guess, reading) for reading in readings], axis=0)


def luma_figures(estimates: list[BlockSchedule], truths: list[BlockSchedule], geometry: CipherGeometry,
                 stored: np.ndarray, plain: np.ndarray) -> tuple[float | None, float]:
    """Each image's estimate against its own truth -> (mean Y-plane layout, None where the plane is not
    square; mean Y-plane SSIM). One estimate for every image (one key) is decrypted in one batch."""
    layouts = [luma_arrangement(e, t, geometry) for e, t in zip(estimates, truths)]
    if all(e is estimates[0] for e in estimates):
        ssims = luma_ssim(estimates[0], geometry, stored, plain)
    else:
        ssims = [luma_ssim(e, geometry, stored[i:i + 1], plain[i:i + 1])[0] for i, e in enumerate(estimates)]
    return (None if None in layouts else float(np.mean(layouts))), float(np.mean(ssims))
