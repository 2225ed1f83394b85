"""Known-plaintext attack: M plain images and their encryptions -> the whole schedule.

Each encrypted block is one plain block under one of 8 rotations/flips, 2 negations and (colour)
6 channel orders. So every encrypted block is compared with every variant of every plain block,
summed over the M pairs, and the closest one is taken, each plain position used once. The secret
stays unknown (HMAC), but the schedule is all the cipher has: every other image of the owner,
past and future, decrypts with it.

Two steps settle the blocks this leaves ambiguous (smooth, grey or symmetric blocks, where several
variants fit within the codec's noise):

1. **re-encoding**: the attacker knows the task's codec, so it encrypts the known plain image with
   each of a block's best candidates, passes it through that codec exactly as the owner does and
   keeps the candidate that reproduces the upload (with 16-pixel blocks on 4:2:0 JPEG a block is
   one MCU: the right candidate reproduces it to the bit, away from the borders the decoder's
   chroma upsampling shares with the neighbours);
2. **the owner's other uploads** (optional: the cloud holds them): candidates that even the codec
   cannot tell apart on the known pair (identical there) are told apart by how well each one's
   borders continue its neighbours', summed over those uploads, decrypted with the rest of the
   schedule.
"""
from __future__ import annotations

import numpy as np

from owners.attacks.common import INVERSE, ScheduleCipher, blocks_of, cipher_planes, make_schedule, plain_planes
from owners.cipher import (
    CHANNEL_ORDERS,
    NUM_TRANSFORMS,
    BlockSchedule,
    CipherGeometry,
    merge_blocks,
    split_blocks,
    transform_block,
)
from protocol.codec import Codec, decode

CANDIDATE_VARIANTS = 2  # candidates per block: this many times the variants of one block (a flat grey block
# fits all of them equally, and the right one must be among those tried)
PLAUSIBLE = (4.0, 4.0)  # a candidate is re-encoded if its error is within a * best + b (per value)
REFINE_ROUNDS = 2  # re-encoding rounds: a block's MCU neighbours are settled in the round before
TIE = 1e-6  # re-encoding errors this close (per pixel) cannot tell candidates apart


def _variant_labels(colour: bool) -> list[tuple[int, int, int]]:
    orders = range(len(CHANNEL_ORDERS)) if colour else [0]
    return [(t, neg, o) for t in range(NUM_TRANSFORMS) for neg in (0, 1) for o in orders]


def _apply_variant(blocks: np.ndarray, label: tuple[int, int, int], colour: bool) -> np.ndarray:
    """(..., b, b, C) plain blocks -> the same blocks encrypted by one (transform, negate, order)."""
    t, neg, o = label
    lead = blocks.ndim - 3
    moved = np.moveaxis(transform_block(np.moveaxis(blocks, (lead, lead + 1), (0, 1)), t), (0, 1), (lead, lead + 1))
    flipped = 255 - moved if neg else moved
    return flipped[..., list(CHANNEL_ORDERS[o])] if colour else flipped


def _variants(plain_blocks: np.ndarray, labels: list, colour: bool) -> np.ndarray:
    """(M, n, b, b, C) -> features (V, n, M*b*b*C) of every (transform, negate, order) variant."""
    n = plain_blocks.shape[1]
    return np.stack([_apply_variant(plain_blocks, lab, colour).transpose(1, 0, 2, 3, 4).reshape(n, -1)
                     for lab in labels]).astype(np.float32)


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


def _candidates(cipher_feats: np.ndarray, variants: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per encrypted block its ``k`` closest (variant, plain block) pairs, best first -> (cost, code)
    with code = variant * n + plain block; each (n, k)."""
    n = len(cipher_feats)
    c_norm = (cipher_feats**2).sum(axis=1)
    top_cost = np.full((n, 0), np.inf, np.float32)
    top_code = np.zeros((n, 0), np.int64)
    for v in range(len(variants)):
        d = c_norm[:, None] + (variants[v] ** 2).sum(axis=1)[None, :] - 2 * cipher_feats @ variants[v].T
        cost = np.concatenate([top_cost, d], axis=1)
        code = np.concatenate([top_code, np.broadcast_to(v * n + np.arange(n), (n, n))], axis=1)
        keep = np.argsort(cost, axis=1, kind="stable")[:, :k]
        top_cost, top_code = np.take_along_axis(cost, keep, 1), np.take_along_axis(code, keep, 1)
    return top_cost, top_code


class _Reencoder:
    """The known plain images encrypted with a choice of candidate per block, through the codec."""

    def __init__(self, plain_blocks: np.ndarray, encrypted: np.ndarray, geometry: CipherGeometry, codec: Codec,
                 labels: list, colour: bool) -> None:
        self.plain_blocks, self.geometry, self.codec = plain_blocks, geometry, codec
        self.labels, self.colour = labels, colour
        self.target = blocks_of(cipher_planes(encrypted), geometry.block).astype(np.float32)
        b = geometry.block
        # 4:2:0 chroma upsampling mixes a block's outer ring with its neighbours' chroma: the inner
        # pixels depend on the block alone when the block is an MCU.
        self.inner = np.zeros((b, b), bool)
        self.inner[1:-1, 1:-1] = b >= 16 and colour
        if not self.inner.any():
            self.inner[:] = True

    def errors(self, codes: np.ndarray) -> np.ndarray:
        """codes: (n,) candidate code per encrypted block -> (n,) squared error per block against the upload."""
        n = self.geometry.num_blocks
        variant, source = np.divmod(codes, n)
        err = np.zeros(n)
        for m in range(len(self.plain_blocks)):
            blocks = np.stack([_apply_variant(self.plain_blocks[m, source[i]], self.labels[variant[i]], self.colour)
                               for i in range(n)])
            plane = merge_blocks(blocks.astype(np.uint8), self.geometry.grid)
            image = plane if self.colour else plane[..., 0]
            again = decode(self.codec.encode(np.ascontiguousarray(image)))
            again_blocks = split_blocks(again if self.colour else again[..., None], self.geometry.block)
            diff = (again_blocks.astype(np.float32) - self.target[m]) ** 2
            err += diff[:, self.inner].reshape(n, -1).mean(axis=1)
        return err / len(self.plain_blocks)


def _groups(geometry: CipherGeometry, colour: bool) -> list[np.ndarray]:
    """Blocks that can change together without sharing a codec unit (a 16x16 MCU on colour)."""
    n = geometry.num_blocks
    if not colour or geometry.block >= 16:
        return [np.arange(n)]
    rows, cols = geometry.grid
    r, c = np.divmod(np.arange(n), cols)
    step = max(1, 16 // geometry.block)
    return [np.flatnonzero((r % step == a) & (c % step == b)) for a in range(step) for b in range(step)]


def _reencode(reencoder: _Reencoder, codes: np.ndarray, plausible: np.ndarray, colour: bool) -> tuple[np.ndarray,
                                                                                                         np.ndarray]:
    """Coordinate descent over the plausible candidates -> (chosen index per block, re-encoding error
    per candidate, infinite where not tried)."""
    n, k = codes.shape
    err = np.full((n, k), np.inf)
    chosen = np.zeros(n, np.int64)
    for _ in range(REFINE_ROUNDS):
        for group in _groups(reencoder.geometry, colour):
            for r in range(k):
                tried = group[plausible[group, r]]
                if not len(tried):
                    continue
                trial = codes[np.arange(n), chosen].copy()
                trial[tried] = codes[tried, r]
                err[tried, r] = reencoder.errors(trial)[tried]
            chosen = chosen.copy()
            chosen[group] = err[group].argmin(axis=1)
    return chosen, err


def _restore(enc: np.ndarray, label: tuple[int, int, int], colour: bool) -> np.ndarray:
    """(N, b, b, C) encrypted blocks -> the plain blocks they are under one (transform, negate, order)."""
    t, neg, o = label
    x = enc[..., list(np.argsort(CHANNEL_ORDERS[o]))] if colour else enc
    x = 255 - x if neg else x
    return np.moveaxis(transform_block(np.moveaxis(x, (1, 2), (0, 1)), int(INVERSE[t])), (0, 1), (1, 2))


def _border_cost(planes: np.ndarray, enc: np.ndarray, geometry: CipherGeometry, code: int, labels: list,
                 colour: bool) -> float:
    """How badly one encrypted block (``enc``: (N, b, b, C) over the other uploads), restored as
    candidate ``code``, continues the borders of its neighbours in those uploads decrypted with the
    rest of the schedule (``planes``): mean squared step across its borders."""
    variant, source = divmod(code, geometry.num_blocks)
    b = geometry.block
    restored = _restore(enc, labels[variant], colour)
    rows, cols = planes.shape[1] // b, planes.shape[2] // b
    r, c = divmod(source, cols)
    y, x = r * b, c * b
    steps = []
    if r > 0:
        steps.append(planes[:, y - 1, x:x + b] - restored[:, 0])
    if r + 1 < rows:
        steps.append(planes[:, y + b, x:x + b] - restored[:, -1])
    if c > 0:
        steps.append(planes[:, y:y + b, x - 1] - restored[:, :, 0])
    if c + 1 < cols:
        steps.append(planes[:, y:y + b, x + b] - restored[:, :, -1])
    return float(np.mean([np.mean(step**2) for step in steps])) if steps else 0.0


def known_plaintext_attack(plain: np.ndarray, encrypted: np.ndarray, geometry: CipherGeometry,
                           codec: Codec | None = None, others: np.ndarray | None = None) -> BlockSchedule:
    """plain: RGB (M, H, W, 3); encrypted: the same images as stored (decoded). -> the schedule.

    ``codec``: the task's codec, to settle ambiguous blocks by re-encoding; ``others``: other
    uploads under the same key as stored (no plain versions), to settle what re-encoding cannot."""
    colour = geometry.scheme == "color"
    labels = _variant_labels(colour)
    n = geometry.num_blocks
    p_blocks = blocks_of(plain_planes(plain, geometry), geometry.block)
    c_blocks = blocks_of(cipher_planes(encrypted), geometry.block).astype(np.float32)
    cipher_feats = c_blocks.transpose(1, 0, 2, 3, 4).reshape(n, -1)
    cost, codes = _candidates(cipher_feats, _variants(p_blocks.astype(np.float32), labels, colour),
                              CANDIDATE_VARIANTS * len(labels))
    chosen = np.zeros(n, np.int64)
    score = cost / max(1, cipher_feats.shape[1])  # mean squared error per value
    ties = np.zeros_like(codes, bool)
    if codec is not None:
        plausible = score <= PLAUSIBLE[0] * score[:, :1] + PLAUSIBLE[1]
        reencoder = _Reencoder(p_blocks, encrypted, geometry, codec, labels, colour)
        chosen, score = _reencode(reencoder, codes, plausible, colour)
        ties = score <= score[np.arange(n), chosen][:, None] + TIE
    schedule = _assign(codes, chosen, score, labels, colour)
    undecided = np.flatnonzero(ties.sum(axis=1) > 1)
    if others is not None and len(others) and len(undecided):
        planes = ScheduleCipher(schedule, geometry).decrypt_planes(others).astype(np.float32)
        enc = blocks_of(cipher_planes(others), geometry.block).astype(np.float32)
        for i in undecided:
            options = np.flatnonzero(ties[i])
            fits = [_border_cost(planes, enc[:, i], geometry, int(codes[i, r]), labels, colour) for r in options]
            chosen[i] = options[int(np.argmin(fits))]
        schedule = _assign(codes, chosen, score, labels, colour)
    return schedule


def _assign(codes: np.ndarray, chosen: np.ndarray, score: np.ndarray, labels: list, colour: bool) -> BlockSchedule:
    """Each encrypted block takes its chosen candidate's plain position and variant; a position wanted
    twice goes to the better match, the other block takes its next candidate (or any free position)."""
    n, k = codes.shape
    worst = float(score[np.isfinite(score)].max())
    preferred = np.where(np.isfinite(score), score, worst + 1.0)  # untried candidates: after every tried one
    preferred[np.arange(n), chosen] = preferred.min(axis=1) - TIE
    matrix = np.full((n, n), np.inf)
    code_at = np.full((n, n), -1)
    for r in np.argsort(-preferred, axis=1, kind="stable").T:  # worst first: the best candidate of a position wins
        rows = np.arange(n)
        matrix[rows, codes[rows, r] % n] = preferred[rows, r]
        code_at[rows, codes[rows, r] % n] = codes[rows, r]
    matrix[~np.isfinite(matrix)] = worst + 2.0  # any free position rather than none (greedy needs finite costs)
    source = greedy_assignment(matrix)
    picked = code_at[np.arange(n), source]
    variant = np.where(picked >= 0, picked, codes[np.arange(n), chosen]) // n
    transform, negate, order = (np.array(x) for x in zip(*[labels[v] for v in variant]))
    return make_schedule(source, transform, negate.astype(bool), order if colour else None)
