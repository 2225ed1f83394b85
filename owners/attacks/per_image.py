"""The one-image-at-a-time attack: each encrypted image alone, as a jigsaw puzzle against the prior.

What a cloud can do with a single upload and no other image under the same key (or against a
per-image key). With one image there are no statistics across images, so every block enters the
puzzle in each of its 12 colourings (negation x channel order) and 8 orientations, and the
borders decide which fits: colours, like edges, continue across block borders. Large puzzles
(more than ``MAX_PIECES`` pieces) fall back to each block's own colour histogram against the
prior. Colour scheme only (the gray scheme's planes cannot be told apart in one image by these
statistics).
"""
from __future__ import annotations

import numpy as np

from owners.attacks.ciphertext_only import HYPOTHESES, colour_attack, then_colour, undo_colour
from owners.attacks.common import INVERSE, blocks_of, cipher_planes, make_schedule
from owners.attacks.jigsaw import place
from owners.attacks.prior import NaturalImagePrior
from owners.cipher import NUM_TRANSFORMS, BlockSchedule, CipherGeometry

MAX_PIECES = 4096  # pieces (block x colouring x orientation) the border matrices may hold


def single_image_attack(encrypted: np.ndarray, geometry: CipherGeometry, prior: NaturalImagePrior) -> BlockSchedule:
    """encrypted: one image as stored, shape (1, ...) -> the schedule estimated from it alone."""
    n, k = geometry.num_blocks, len(HYPOTHESES)
    if n * k * NUM_TRANSFORMS > MAX_PIECES:
        return colour_attack(encrypted, geometry, prior)
    blocks = blocks_of(cipher_planes(encrypted), geometry.block)
    coloured = np.stack([undo_colour(blocks[:, i], *h) for i in range(n) for h in HYPOTHESES], axis=1)
    rows, cols = geometry.grid
    recolour = [lambda x, h=h: undo_colour(x, *h) for h in HYPOTHESES]
    grid, overall = place(coloured, rows, cols, prior.mean_image, recolour, variants=k)
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
