"""Ciphertext-only attack on grayscale-based EtC (the Y, Cb and Cr planes side by side, 8x8 blocks).

1. which plane a block came from: Y blocks carry the texture (their pixels vary most inside a
   block), Cb and Cr blocks are smooth; the chroma blocks split into two groups by which others
   their means move with across images (each plane's blocks follow that image's colour cast);
2. negation: within a group, a negated block's mean moves against the group's consensus; which
   group is Cb and whether each group as a whole is negated comes from the prior's Y/Cb/Cr
   histograms;
3. each plane is then its own jigsaw puzzle, solved as in the colour scheme.
"""
from __future__ import annotations

import numpy as np

from owners.attacks.common import ALIGN_ROUNDS, INVERSE, blocks_of, cipher_planes, make_schedule, standardised
from owners.attacks.jigsaw import assemble, place, turned_grid
from owners.attacks.prior import NaturalImagePrior, plane_histogram
from owners.cipher import NUM_TRANSFORMS, BlockSchedule, CipherGeometry
from owners.errors import OwnerError

MIN_IMAGES = 8
EDGE_IMAGES = 200  # images used to turn the chroma planes onto the luma plane


def _edges(planes: np.ndarray) -> np.ndarray:
    """(N, H, W) -> gradient magnitude, standardised per image."""
    gy, gx = np.gradient(planes.astype(np.float32), axis=(1, 2))
    mag = np.hypot(gx, gy).reshape(len(planes), -1)
    return (mag - mag.mean(axis=1, keepdims=True)) / (mag.std(axis=1, keepdims=True) + 1e-6)


def _onto_luma(grid: np.ndarray, blocks: np.ndarray, luma_edges: np.ndarray) -> np.ndarray:
    """Turn a chroma plane's solved grid the way its edges best fall on the luma plane's edges
    (colour boundaries are brightness boundaries): the chroma planes' own mirror ambiguity goes."""
    scores = [float((_edges(assemble(blocks, turned_grid(grid, g))[..., 0]) * luma_edges).sum())
              for g in range(NUM_TRANSFORMS)]
    return turned_grid(grid, int(np.argmax(scores)))


def _signs(z: np.ndarray) -> np.ndarray:
    """z: (N, k) standardised block means of one group -> +1/-1 per block against the consensus."""
    template = z[:, int(np.argmax(np.abs(z.T @ z).sum(axis=1)))]
    for _ in range(ALIGN_ROUNDS):
        sign = np.where(z.T @ template >= 0, 1, -1)
        template = standardised((z * sign).mean(axis=1))
    return sign


def _chroma_groups(z: np.ndarray) -> np.ndarray:
    """z: (N, 2k) standardised means of the chroma blocks -> 0/1 group per block, k each."""
    corr = np.abs(z.T @ z) / len(z)
    a = int(np.argmax(corr.sum(axis=1)))
    b = int(np.argmin(corr[a]))
    group = np.zeros(z.shape[1], np.int64)
    for _ in range(ALIGN_ROUNDS):
        score_a = corr[:, group == 0].mean(axis=1) if (group == 0).any() else corr[:, a]
        score_b = corr[:, group == 1].mean(axis=1) if (group == 1).any() else corr[:, b]
        ranked = np.argsort(score_b - score_a, kind="stable")
        group = np.zeros(z.shape[1], np.int64)
        group[ranked[z.shape[1] // 2:]] = 1
    return group


def _assign_planes(blocks: np.ndarray, prior: NaturalImagePrior) -> tuple[np.ndarray, np.ndarray]:
    """(N, n, b, b) -> plane (0 Y, 1 Cb, 2 Cr) and negation per block."""
    n_img, n = blocks.shape[:2]
    texture = blocks.reshape(n_img, n, -1).std(axis=2).mean(axis=0)
    z = standardised(blocks.reshape(n_img, n, -1).mean(axis=2))
    luma = np.argsort(-texture)[: n // 3]
    chroma = np.setdiff1d(np.arange(n), luma)
    groups = [luma] + [chroma[_chroma_groups(z[:, chroma]) == k] for k in (0, 1)]
    signs = [_signs(z[:, g]) for g in groups]
    best, best_fit = None, -np.inf
    for cb_first in (True, False):
        order = (groups[0], groups[1], groups[2]) if cb_first else (groups[0], groups[2], groups[1])
        sgn = (signs[0], signs[1], signs[2]) if cb_first else (signs[0], signs[2], signs[1])
        for flips in np.ndindex(2, 2, 2):
            fit = 0.0
            for plane, (members, s, f) in enumerate(zip(order, sgn, flips)):
                neg = (s < 0) ^ bool(f)
                vals = np.where(neg[None, :, None], 255 - blocks[:, members].reshape(n_img, len(members), -1),
                                blocks[:, members].reshape(n_img, len(members), -1))
                fit += float((plane_histogram(vals) * np.log(prior.plane_hist[plane])).sum())
            if fit > best_fit:
                best, best_fit = (order, sgn, flips), fit
    plane, negate = np.zeros(n, np.int64), np.zeros(n, bool)
    for k, (members, s, f) in enumerate(zip(*best)):
        plane[members] = k
        negate[members] = (s < 0) ^ bool(f)
    return plane, negate


def gray_attack(encrypted: np.ndarray, geometry: CipherGeometry, prior: NaturalImagePrior) -> BlockSchedule:
    if len(encrypted) < MIN_IMAGES:
        raise OwnerError(f"the gray-scheme ciphertext-only attack needs at least {MIN_IMAGES} images")
    blocks = blocks_of(cipher_planes(encrypted), geometry.block)[..., 0]  # (N, n, b, b)
    plane, negate = _assign_planes(blocks, prior)
    restored = np.where(negate[None, :, None, None], 255 - blocks, blocks)[..., None]
    side = geometry.width // geometry.block
    rows = geometry.height // geometry.block
    n = geometry.num_blocks
    source, transform = np.zeros(n, np.int64), np.zeros(n, np.int64)
    luma_edges = None
    for k in range(3):
        members = np.flatnonzero(plane == k)
        grid, _ = place(restored[:, members], rows, side, prior.mean_planes[k][..., None])
        sample = restored[:EDGE_IMAGES, members]
        if luma_edges is None:
            luma_edges = _edges(assemble(sample, grid)[..., 0])
        else:
            grid = _onto_luma(grid, sample, luma_edges)
        for pos, piece in enumerate(grid.reshape(-1)):
            block = members[piece // NUM_TRANSFORMS]
            r, c = divmod(pos, side)
            source[block] = r * 3 * side + k * side + c
            transform[block] = INVERSE[piece % NUM_TRANSFORMS]
    return make_schedule(source, transform, negate, None)
