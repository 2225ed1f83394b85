"""Image similarity metrics shared by benchmarks and tests (numpy only). PSNR: ``protocol.codec.psnr``."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(images: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (N, H, W) float images."""
    rows = sliding_window_view(images, len(window), axis=1) @ window
    return sliding_window_view(rows, len(window), axis=2) @ window


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Mean SSIM per image (Wang et al. 2004) of uint8 batches (N, H, W) or (N, H, W, C).

    Colour images: the mean over channels. A Gaussian window of ``window`` pixels (7 suits
    32x32 images; 11 is the paper's choice for large ones), constants K1=0.01, K2=0.03, L=255.
    """
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.ndim == 4:
        return np.mean([ssim(a[..., c], b[..., c], window, sigma) for c in range(a.shape[-1])], axis=0)
    w = _gaussian_window(window, sigma)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    var_a = _filter(a * a, w) - mu_a**2
    var_b = _filter(b * b, w) - mu_b**2
    cov = _filter(a * b, w) - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return smap.reshape(len(a), -1).mean(axis=1)

