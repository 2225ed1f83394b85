"""The public natural-image prior a ciphertext-only attacker is assumed to hold.

Built from plain images of the same kind as the owner's (any public data set of the domain; the
audit uses plain images held out from the ones it attacks). Three statistics, all at the task's
image size: the mean image (what is up, what is down), the joint colour histogram (8 bins per
channel), the same histogram per region of a 4x4 grid over the image (sky-blue at the top,
brown or green at the bottom: orientation and colouring in one statistic) and, for the gray
scheme, the histogram of each of the Y, Cb and Cr planes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from owners.cipher import rgb_to_stacked_ycbcr

COLOUR_BINS = 8  # per channel; 256/8 = 32 values a bin, so p -> 255-p maps bin b to bin 7-b exactly
PLANE_BINS = 64
REGIONS = 4  # the region histograms' grid is REGIONS x REGIONS


@dataclass(frozen=True)
class NaturalImagePrior:
    mean_image: np.ndarray  # (H, W, 3) float, RGB
    mean_planes: np.ndarray  # (3, H, W) float, Y, Cb, Cr
    colour_hist: np.ndarray  # (8, 8, 8) probabilities
    plane_hist: np.ndarray  # (3, 64) probabilities of Y, Cb, Cr
    region_log_hist: np.ndarray  # (REGIONS**2, 512) log-probability of each colour bin in each region

    @classmethod
    def from_images(cls, images: np.ndarray) -> NaturalImagePrior:
        """images: plain RGB (N, H, W, 3) uint8 of the task's size."""
        n, h, w, _ = images.shape
        planes = rgb_to_stacked_ycbcr(images).reshape(n, h, 3, w).transpose(0, 2, 1, 3)
        return cls(images.mean(axis=0), planes.mean(axis=0), colour_histogram(images.reshape(-1, 3)),
                   np.stack([plane_histogram(planes[:, p]) for p in range(3)]), _region_log_hist(images))

    def region_log_likelihood(self, images: np.ndarray) -> np.ndarray:
        """(K, H, W, 3) candidate images -> (K,) log-likelihood of their pixels under the region histograms."""
        flat = colour_bins(images.reshape(len(images), -1, 3))  # (K, H*W)
        region = region_of(*images.shape[1:3]).reshape(-1)
        return self.region_log_hist[region[None, :], flat].sum(axis=1)


def colour_bins(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) values 0..255 -> (...) joint colour bin 0..511."""
    b = np.clip(pixels, 0, 255).astype(np.int64) // (256 // COLOUR_BINS)
    return (b[..., 0] * COLOUR_BINS + b[..., 1]) * COLOUR_BINS + b[..., 2]


def colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """(P, 3) uint8 -> (8, 8, 8) probabilities (add-one smoothed)."""
    counts = np.bincount(colour_bins(pixels), minlength=COLOUR_BINS**3)
    return ((counts + 1) / (counts.sum() + COLOUR_BINS**3)).reshape((COLOUR_BINS,) * 3)


def region_of(height: int, width: int) -> np.ndarray:
    """(H, W) -> the region (0..REGIONS**2-1) of every pixel."""
    rows, cols = np.arange(height) * REGIONS // height, np.arange(width) * REGIONS // width
    return rows[:, None] * REGIONS + cols[None, :]


REGION_SIDE = 32  # pixels per side sampled for the region histograms (larger images are strided)


def _region_log_hist(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (REGIONS**2, 512): each region's log colour histogram (add-one smoothed)."""
    step = max(1, images.shape[1] // REGION_SIDE)
    sampled = images[:, ::step, ::step]
    n, h, w, _ = sampled.shape
    bins = colour_bins(sampled.reshape(n, -1, 3)).reshape(-1)
    region = np.broadcast_to(region_of(h, w).reshape(-1), (n, h * w)).reshape(-1)
    counts = np.bincount(region * COLOUR_BINS**3 + bins, minlength=REGIONS**2 * COLOUR_BINS**3)
    counts = counts.reshape(REGIONS**2, COLOUR_BINS**3)
    return np.log((counts + 1) / (counts.sum(axis=1, keepdims=True) + COLOUR_BINS**3))


def plane_histogram(values: np.ndarray) -> np.ndarray:
    counts = np.bincount(values.reshape(-1).astype(np.int64) // (256 // PLANE_BINS), minlength=PLANE_BINS)
    return (counts + 1) / (counts.sum() + PLANE_BINS)
