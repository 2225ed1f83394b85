"""The one-image-at-a-time attack: each encrypted image alone, as a jigsaw puzzle against the prior.

What a cloud can do with a single upload and no other image under the same key (or against a
per-image key). With one image there are no statistics across images, so every block enters the
puzzle in each of its 12 colourings (negation x channel order) and 8 orientations, and the
borders decide which fits: colours, like edges, continue across block borders.

* A 2x2 puzzle (the default 32x32 geometry with 16-pixel blocks) is solved exactly: for each of
  the 24 placements of the blocks, the cheapest of the 96^4 orientations and colourings around
  the puzzle's one cycle of borders (a min-sum product over the cycle, 96^3 per placement).
* Larger puzzles are placed greedily (:func:`owners.attacks.jigsaw.solve`); more than
  ``MAX_PIECES`` pieces fall back to each block's own colour histogram against the prior.

Borders cannot tell the whole picture from itself turned or recoloured as a whole, so that last
choice (8 turns x 12 colourings) is the one the prior's region histograms like best (sky-blue at
the top, brown or green at the bottom).

The gray scheme (Y, Cb and Cr planes side by side, no colourings to try) has its own one-image
attack, :func:`owners.attacks.gray.few_images_attack`, to which :func:`single_image_attack` hands it.
"""
from __future__ import annotations

import itertools

import numpy as np

from owners.attacks.ciphertext_only import HYPOTHESES, colour_attack, then_colour, undo_colour
from owners.attacks.common import INVERSE, blocks_of, cipher_planes, make_schedule
from owners.attacks.gray import few_images_attack
from owners.attacks.jigsaw import dissimilarities, mean_picture, solve, turned_grid
from owners.attacks.prior import NaturalImagePrior
from owners.cipher import NUM_TRANSFORMS, BlockSchedule, CipherGeometry, transform_block

MAX_PIECES = 4096  # pieces (block x colouring x orientation) the border matrices may hold


def solve_two_by_two(lr: np.ndarray, tb: np.ndarray, per: int) -> np.ndarray:
    """Exact cheapest 2x2 arrangement -> (2, 2) grid of pieces (``per`` pieces per block).

    With a = top left, b = top right, c = bottom left, d = bottom right the cost is
    LR[a,b] + TB[b,d] + TB[a,c] + LR[c,d]: for fixed blocks per position, minimise over b and c
    for every (a, d), then over (a, d)."""
    best, best_grid = np.inf, None
    for blocks in itertools.permutations(range(4)):
        a, b, c, d = (np.arange(per) + k * per for k in blocks)
        via_b = lr[np.ix_(a, b)][:, :, None] + tb[np.ix_(b, d)][None, :, :]  # (a, b, d)
        via_c = tb[np.ix_(a, c)][:, :, None] + lr[np.ix_(c, d)][None, :, :]  # (a, c, d)
        total = via_b.min(axis=1) + via_c.min(axis=1)
        i, j = np.unravel_index(int(np.argmin(total)), total.shape)
        if total[i, j] < best:
            best = float(total[i, j])
            best_grid = np.array([[a[i], b[int(np.argmin(via_b[i, :, j]))]],
                                  [c[int(np.argmin(via_c[i, :, j]))], d[j]]])
    return best_grid


def upright_by_regions(grid: np.ndarray, blocks: np.ndarray, prior: NaturalImagePrior) -> tuple[np.ndarray, int]:
    """The whole-picture turn and colouring the prior's region histograms like best -> (grid, colouring)."""
    picture = mean_picture(blocks[0].astype(np.float64), grid)
    candidates = [(g, k) for k in range(len(HYPOTHESES)) for g in range(NUM_TRANSFORMS)]
    pictures = np.stack([transform_block(undo_colour(picture, *HYPOTHESES[k]), g) for g, k in candidates])
    g, k = candidates[int(np.argmax(prior.region_log_likelihood(pictures)))]
    return turned_grid(grid, g), k


def single_image_attack(encrypted: np.ndarray, geometry: CipherGeometry, prior: NaturalImagePrior) -> BlockSchedule:
    """encrypted: one image as stored, shape (1, ...) -> the schedule estimated from it alone."""
    if geometry.scheme == "gray":
        return few_images_attack(encrypted, geometry, prior)
    n, k = geometry.num_blocks, len(HYPOTHESES)
    if n * k * NUM_TRANSFORMS > MAX_PIECES:
        return colour_attack(encrypted, geometry, prior)
    blocks = blocks_of(cipher_planes(encrypted), geometry.block)
    coloured = np.stack([undo_colour(blocks[:, i], *h) for i in range(n) for h in HYPOTHESES], axis=1)
    rows, cols = geometry.grid
    lr, tb = dissimilarities(coloured, variants=k)
    if (rows, cols) == (2, 2):
        grid = solve_two_by_two(lr, tb, k * NUM_TRANSFORMS)
    else:
        grid = solve(lr, tb, rows, cols, variants=k)
    grid, overall = upright_by_regions(grid, coloured, prior)
    source, transform = np.zeros(n, np.int64), np.zeros(n, np.int64)
    steps = [(0, 0)] * n
    for pos, piece in enumerate(grid.reshape(-1)):
        variant = piece // NUM_TRANSFORMS
        block = variant // k
        source[block], transform[block] = pos, INVERSE[piece % NUM_TRANSFORMS]
        steps[block] = then_colour(HYPOTHESES[variant % k], HYPOTHESES[overall])
    negate, order = zip(*steps)
    return make_schedule(source, transform, np.array(negate, bool), np.array(order))


def per_image_attack(encrypted: np.ndarray, geometry: CipherGeometry,
                     prior: NaturalImagePrior) -> list[BlockSchedule]:
    """One estimated schedule per image (each from that image alone)."""
    return [single_image_attack(encrypted[i:i + 1], geometry, prior) for i in range(len(encrypted))]
