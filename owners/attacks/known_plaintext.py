"""Known-plaintext attack: M plain images and their encryptions -> the whole schedule.

Each encrypted block is one plain block under one of 8 rotations/flips, 2 negations and (colour)
6 channel orders. So every encrypted block is compared with every variant of every plain block,
summed over the M pairs, and the closest one is taken, each plain position used once. One pair
fixes every block that is not flat or symmetric; JPEG noise does not move the minimum. The secret
stays unknown (HMAC), but the schedule is all the cipher has: every other image of the owner,
past and future, decrypts with it.
"""
from __future__ import annotations

import numpy as np

from owners.attacks.common import blocks_of, cipher_planes, make_schedule, plain_planes
from owners.cipher import CHANNEL_ORDERS, NUM_TRANSFORMS, BlockSchedule, CipherGeometry, transform_block


def _variants(plain_blocks: np.ndarray, colour: bool) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(M, n, b, b, C) -> features (V, n, M*b*b*C) of every (transform, negate, order) variant."""
    m, n = plain_blocks.shape[:2]
    feats, labels = [], []
    orders = range(len(CHANNEL_ORDERS)) if colour else [0]
    for t in range(NUM_TRANSFORMS):
        moved = transform_block(plain_blocks.transpose(2, 3, 0, 1, 4), t).transpose(2, 3, 0, 1, 4)
        for neg in (0, 1):
            flipped = 255.0 - moved if neg else moved
            for o in orders:
                shuffled = flipped[..., list(CHANNEL_ORDERS[o])] if colour else flipped
                feats.append(shuffled.transpose(1, 0, 2, 3, 4).reshape(n, -1))
                labels.append((t, neg, o))
    return np.stack(feats).astype(np.float32), labels


def greedy_assignment(cost: np.ndarray) -> np.ndarray:
    """Row -> column, each column used once: rows take their cheapest free column, conflicts go
    to the cheapest row, the rest try again (cheap and exact when the right match is clear)."""
    n = len(cost)
    choice = np.full(n, -1)
    free_cols = np.ones(cost.shape[1], bool)
    while (choice < 0).any():
        rows = np.flatnonzero(choice < 0)
        sub = np.where(free_cols[None, :], cost[rows], np.inf)
        best = sub.argmin(axis=1)
        order = np.argsort(sub[np.arange(len(rows)), best], kind="stable")
        for r, col in zip(rows[order], best[order]):
            if free_cols[col]:
                choice[r] = col
                free_cols[col] = False
    return choice


def known_plaintext_attack(plain: np.ndarray, encrypted: np.ndarray, geometry: CipherGeometry) -> BlockSchedule:
    """plain: RGB (M, H, W, 3); encrypted: the same images as stored (decoded). -> the schedule."""
    colour = geometry.scheme == "color"
    p_blocks = blocks_of(plain_planes(plain, geometry), geometry.block).astype(np.float32)
    c_blocks = blocks_of(cipher_planes(encrypted), geometry.block).astype(np.float32)
    n = geometry.num_blocks
    cipher_feats = c_blocks.transpose(1, 0, 2, 3, 4).reshape(n, -1)
    variants, labels = _variants(p_blocks, colour)
    v_norm = (variants**2).sum(axis=2)  # (V, n)
    c_norm = (cipher_feats**2).sum(axis=1)  # (n,)
    cost = np.full((n, n), np.inf, np.float32)
    best_variant = np.zeros((n, n), np.int64)
    for v in range(len(variants)):
        d = c_norm[:, None] + v_norm[v][None, :] - 2 * cipher_feats @ variants[v].T  # (cipher, plain)
        better = d < cost
        cost = np.where(better, d, cost)
        best_variant = np.where(better, v, best_variant)
    source = greedy_assignment(cost)
    picked = [labels[v] for v in best_variant[np.arange(n), source]]
    transform, negate, order = (np.array(x) for x in zip(*picked))
    return make_schedule(source, transform, negate.astype(bool), order if colour else None)
