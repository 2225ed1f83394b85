"""Per-image keys: every image under its own fresh random schedule, each attack scored per image.

With ``Task.key_mode = "per-image"`` no two uploads share a schedule, so the statistics the pooled
attack relies on (block means that move together, borders that fit in every image) no longer
belong to one key. The audit measures what is left, with the same attacks:

* the pooled ciphertext-only attack run anyway over all uploads: its one schedule is scored
  against each image's own (the fraction of that image's schedule it got right) and its
  reconstruction of each image against that image;
* one image at a time (:mod:`owners.attacks.per_image`): nothing changes for it, each image was
  always attacked alone;
* known plaintext: the schedule read from one leaked pair, applied to every other image.

The truth is kept by the caller (the audit or the benchmark), never stored or uploaded.
"""
from __future__ import annotations

import secrets

import numpy as np

from owners.attacks.scoring import Score, mean_score, score_attack
from owners.cipher import BlockCipher, BlockSchedule, CipherGeometry
from protocol.codec import Codec, decode

SECRET_BYTES = 32


def encrypt_each(images: np.ndarray, geometry: CipherGeometry, codec: Codec) -> tuple[np.ndarray, list[BlockSchedule]]:
    """Each RGB image under its own key from a fresh random secret (as the per-image-key strategy
    draws them), passed through the stored codec as an upload would be -> (stored, schedules)."""
    stored, schedules = [], []
    for image in images:
        cipher = BlockCipher(secrets.token_bytes(SECRET_BYTES), geometry)
        stored.append(decode(codec.encode(cipher.encrypt(image[None])[0])))
        schedules.append(cipher.schedule)
    return np.stack(stored), schedules


def score_each(estimates: list[BlockSchedule], schedules: list[BlockSchedule], geometry: CipherGeometry,
               stored: np.ndarray, plain: np.ndarray) -> Score:
    """Mean over images of each image's estimate scored against that image's own schedule."""
    return mean_score([score_attack(e, s, geometry, stored[i:i + 1], plain[i:i + 1])
                       for i, (e, s) in enumerate(zip(estimates, schedules))])
