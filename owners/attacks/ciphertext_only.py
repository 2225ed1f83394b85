"""Ciphertext-only attack on key reuse: N encrypted images of one owner -> the schedule.

No key is searched. Each part of the schedule leaves its own trace in statistics pooled, per
block position, over the owner's images (all encrypted under the same schedule):

1. negative-positive and channel order (colour) / plane and negation (gray): the mean colour of
   a block moves with the rest of its image (a bright, bluish photo is bright and bluish in most
   of its blocks), so across images the block means of two positions correlate; a negated block
   correlates negatively, a channel-shuffled one with its channels shuffled. Every block is
   aligned to the consensus of all blocks; what is left is one choice for the whole image,
   taken from the public prior's colour (or Y/Cb/Cr) histogram.
2. position and orientation: a jigsaw puzzle whose border dissimilarities are summed over all
   images (:mod:`owners.attacks.jigsaw`); the whole puzzle's rotation is taken from the prior's
   mean image (the sky is up). A left-right mirror image is as natural as the image, so that one
   flip stays undecided (scoring allows for it).

With fewer than ``MIN_POOLED`` images the colour step falls back to each block's own histogram
against the prior (the per-image attack).
"""
from __future__ import annotations

import numpy as np

from owners.attacks.common import (
    ALIGN_ROUNDS,
    INVERSE,
    ORDER_INVERSE,
    blocks_of,
    cipher_planes,
    make_schedule,
    standardised,
)
from owners.attacks.gray import gray_attack
from owners.attacks.jigsaw import place
from owners.attacks.prior import NaturalImagePrior, colour_histogram
from owners.cipher import CHANNEL_ORDERS, NUM_TRANSFORMS, BlockSchedule, CipherGeometry

MIN_POOLED = 8  # images needed for correlations across images to mean anything
HIST_PIXELS = 400_000  # pixels sampled for histogram decisions
HYPOTHESES = [(neg, o) for neg in (0, 1) for o in range(len(CHANNEL_ORDERS))]


def undo_colour(x: np.ndarray, negate: int, order: int) -> np.ndarray:
    """Undo steps 3-4 for one (negate, channel order) on (..., 3) values (uint8 or float)."""
    x = 255 - x if negate else x
    return x[..., list(CHANNEL_ORDERS[ORDER_INVERSE[order]])]


def then_colour(first: tuple[int, int], second: tuple[int, int]) -> tuple[int, int]:
    """The (negate, order) whose undo equals undoing ``first`` and then ``second``."""
    probe = undo_colour(undo_colour(np.array([0.0, 1.0, 2.0]), *first), *second)
    for h in HYPOTHESES:
        if np.array_equal(undo_colour(np.array([0.0, 1.0, 2.0]), *h), probe):
            return h
    raise AssertionError("colour hypotheses are closed under composition")


def _colour_features(means: np.ndarray) -> np.ndarray:
    """(N, n, 3) block means -> (12 hypotheses, N, n, 4): brightness and 3 chroma, standardised."""
    out = []
    for h in HYPOTHESES:
        u = undo_colour(means, *h)
        lum = u.mean(axis=-1, keepdims=True)
        out.append(standardised(np.concatenate([lum, u - lum], axis=-1)))
    return np.stack(out)


def relative_colour(means: np.ndarray) -> np.ndarray:
    """Per block the hypothesis index that aligns it with the consensus of all blocks."""
    feats = _colour_features(means)  # (12, N, n, 4)
    identity = feats[0]
    reference = int(np.argmax(np.abs(np.einsum("kif,kjf->ij", identity, identity)).sum(axis=1)))
    template = identity[:, reference]
    for _ in range(ALIGN_ROUNDS):
        fit = np.einsum("hkif,kf->hi", feats, template)
        choice = fit.argmax(axis=0)
        aligned = feats[choice, :, np.arange(feats.shape[2])]  # (n, N, 4)
        template = standardised(aligned.mean(axis=0))
    return choice


def _histogram_fit(counts: np.ndarray, prior: NaturalImagePrior) -> np.ndarray:
    """Log-likelihood under the prior of pixels whose histogram is ``counts``, after each global
    (negate, order) undo: negation reverses every axis, a channel order transposes them."""
    scores = []
    for neg, o in HYPOTHESES:
        h = counts[::-1, ::-1, ::-1] if neg else counts
        h = np.transpose(h, list(CHANNEL_ORDERS[ORDER_INVERSE[o]]))
        scores.append(float((h * np.log(prior.colour_hist)).sum()))
    return np.array(scores)


def _sample_pixels(blocks: np.ndarray) -> np.ndarray:
    pixels = blocks.reshape(-1, blocks.shape[-1])
    step = max(1, len(pixels) // HIST_PIXELS)
    return pixels[::step]


def colour_steps(blocks: np.ndarray, prior: NaturalImagePrior) -> list[tuple[int, int]]:
    """(N, n, b, b, 3) uint8 encrypted blocks -> per block the (negate, order) to undo, relative to
    one choice for the whole image that :func:`upright` makes (absolute when N < MIN_POOLED)."""
    n = blocks.shape[1]
    if len(blocks) < MIN_POOLED:  # each block on its own against the prior
        return [HYPOTHESES[int(np.argmax(_histogram_fit(
            colour_histogram(_sample_pixels(blocks[:, i])) * 1.0, prior)))] for i in range(n)]
    relative = relative_colour(blocks.reshape(len(blocks), n, -1, 3).mean(axis=2))
    return [HYPOTHESES[r] for r in relative]


def colour_attack(encrypted: np.ndarray, geometry: CipherGeometry, prior: NaturalImagePrior) -> BlockSchedule:
    blocks = blocks_of(cipher_planes(encrypted), geometry.block)
    steps = colour_steps(blocks, prior)
    restored = np.stack([undo_colour(blocks[:, i], *steps[i]) for i in range(len(steps))], axis=1)
    rows, cols = geometry.grid
    overall = HYPOTHESES if len(blocks) >= MIN_POOLED else [(0, 0)]
    grid, k = place(restored, rows, cols, prior.mean_image, [lambda x, h=h: undo_colour(x, *h) for h in overall])
    steps = [then_colour(step, overall[k]) for step in steps]
    n = geometry.num_blocks
    source, transform = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for pos, piece in enumerate(grid.reshape(-1)):
        source[piece // NUM_TRANSFORMS] = pos
        transform[piece // NUM_TRANSFORMS] = INVERSE[piece % NUM_TRANSFORMS]
    negate, order = zip(*steps)
    return make_schedule(source, transform, np.array(negate, bool), np.array(order))


def ciphertext_only_attack(encrypted: np.ndarray, geometry: CipherGeometry,
                           prior: NaturalImagePrior) -> BlockSchedule:
    """encrypted: N images of one key as stored (decoded) -> the estimated schedule."""
    if geometry.scheme == "color":
        return colour_attack(encrypted, geometry, prior)
    return gray_attack(encrypted, geometry, prior)

