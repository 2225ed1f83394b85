"""The one-image-at-a-time attack: each encrypted image alone, as a jigsaw puzzle against the prior.

What a cloud can do with a single upload and no other image under the same key (or against a
per-image key): each block's colour steps from its own histogram, then the puzzle from that one
image's borders. Colour scheme only (the gray scheme's planes cannot be told apart in one image
by these statistics).
"""
from __future__ import annotations

import numpy as np

from owners.attacks.ciphertext_only import colour_attack
from owners.attacks.prior import NaturalImagePrior
from owners.cipher import BlockSchedule, CipherGeometry


def per_image_attack(encrypted: np.ndarray, geometry: CipherGeometry,
                     prior: NaturalImagePrior) -> list[BlockSchedule]:
    """One estimated schedule per image (each from that image alone)."""
    return [colour_attack(encrypted[i:i + 1], geometry, prior) for i in range(len(encrypted))]
