"""The public natural-image prior a ciphertext-only attacker is assumed to hold.

Built from plain images of the same kind as the owner's (any public data set of the domain; the
audit uses plain images held out from the ones it attacks). Three statistics, all at the task's
image size: the mean image (what is up, what is down), the joint colour histogram (8 bins per
channel) and, for the gray scheme, the histogram of each of the Y, Cb and Cr planes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from owners.cipher import rgb_to_stacked_ycbcr

COLOUR_BINS = 8  # per channel; 256/8 = 32 values a bin, so p -> 255-p maps bin b to bin 7-b exactly
PLANE_BINS = 64


@dataclass(frozen=True)
class NaturalImagePrior:
    mean_image: np.ndarray  # (H, W, 3) float, RGB
    mean_planes: np.ndarray  # (3, H, W) float, Y, Cb, Cr
    colour_hist: np.ndarray  # (8, 8, 8) probabilities
    plane_hist: np.ndarray  # (3, 16) probabilities of Y, Cb, Cr

    @classmethod
    def from_images(cls, images: np.ndarray) -> NaturalImagePrior:
        """images: plain RGB (N, H, W, 3) uint8 of the task's size."""
        n, h, w, _ = images.shape
        planes = rgb_to_stacked_ycbcr(images).reshape(n, h, 3, w).transpose(0, 2, 1, 3)
        return cls(images.mean(axis=0), planes.mean(axis=0), colour_histogram(images.reshape(-1, 3)),
                   np.stack([plane_histogram(planes[:, p]) for p in range(3)]))


def colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """(P, 3) uint8 -> (8, 8, 8) probabilities (add-one smoothed)."""
    b = pixels.astype(np.int64) // (256 // COLOUR_BINS)
    counts = np.bincount((b[:, 0] * COLOUR_BINS + b[:, 1]) * COLOUR_BINS + b[:, 2], minlength=COLOUR_BINS**3)
    return ((counts + 1) / (counts.sum() + COLOUR_BINS**3)).reshape((COLOUR_BINS,) * 3)


def plane_histogram(values: np.ndarray) -> np.ndarray:
    counts = np.bincount(values.reshape(-1).astype(np.int64) // (256 // PLANE_BINS), minlength=PLANE_BINS)
    return (counts + 1) / (counts.sum() + PLANE_BINS)
