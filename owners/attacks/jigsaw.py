"""A jigsaw solver over pooled border statistics: where each block goes and which way up.

A *piece* is one encrypted block under one of the 8 rotations/flips (piece = 8 * block + code,
the code being what restores it). Two pieces fit side by side when each one's border, extended
by its own gradient, predicts the other's border (prediction-based dissimilarity, as in
Pomeranz et al. and Gallagher's jigsaw solvers). The owner's images share one key, so the
dissimilarity is summed over all of them: noise averages out and the true neighbours stand out
more with every image. The solver places pieces greedily, most confident first (best cost over
the second-best block's cost), inside a grid of the puzzle's size.
"""
from __future__ import annotations

import numpy as np

from owners.attacks.common import COMPOSE
from owners.cipher import NUM_TRANSFORMS, transform_block

CHUNK = 64  # images per step when summing dissimilarities (bounds memory for large images)
STRIPS = ("right", "right2", "left", "left2", "bottom", "bottom2", "top", "top2")


def _strip_index(block: int) -> np.ndarray:
    """(8 codes, 8 strips, block): pixel indices (in the unrestored block) of each border strip."""
    table = np.zeros((NUM_TRANSFORMS, len(STRIPS), block), np.int64)
    idx = np.arange(block * block).reshape(block, block)
    for v in range(NUM_TRANSFORMS):
        r = transform_block(idx, v)
        table[v] = [r[:, -1], r[:, -2], r[:, 0], r[:, 1], r[-1, :], r[-2, :], r[0, :], r[1, :]]
    return table


def _pair_cost(near_a, far_a, near_c, far_c) -> np.ndarray:
    """(P, F) strips -> (P, P): a's predicted border vs c's, plus c's predicted border vs a's."""
    pred_a = 1.5 * near_a - 0.5 * far_a
    pred_c = 1.5 * near_c - 0.5 * far_c
    d = (pred_a**2).sum(1)[:, None] + (near_c**2).sum(1)[None, :] - 2 * pred_a @ near_c.T
    d += (near_a**2).sum(1)[:, None] + (pred_c**2).sum(1)[None, :] - 2 * near_a @ pred_c.T
    return d


def dissimilarities(blocks: np.ndarray, variants: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """blocks: (N, n, b, b, C) restored-colour blocks -> (LR, TB), each (8n, 8n) float64:
    LR[a, c] for piece a left of piece c, TB[a, c] for a above c; summed over the N images
    (mean per border pixel). Pieces of the same block never touch (infinite); with ``variants``
    > 1, each run of that many consecutive blocks is one block in several colourings."""
    n_img, n, b, _, ch = blocks.shape
    table = _strip_index(b)
    pieces = n * NUM_TRANSFORMS
    lr = np.zeros((pieces, pieces))
    tb = np.zeros((pieces, pieces))
    for start in range(0, n_img, CHUNK):
        flat = blocks[start:start + CHUNK].reshape(-1, n, b * b, ch).astype(np.float32)
        strips = flat[:, :, table]  # (k, n, 8 codes, 8 strips, b, C)
        strips = strips.transpose(1, 2, 3, 0, 4, 5).reshape(pieces, len(STRIPS), -1)
        s = {name: strips[:, i] for i, name in enumerate(STRIPS)}
        lr += _pair_cost(s["right"], s["right2"], s["left"], s["left2"])
        tb += _pair_cost(s["bottom"], s["bottom2"], s["top"], s["top2"])
    per = NUM_TRANSFORMS * variants
    same = np.arange(pieces)[:, None] // per == np.arange(pieces)[None, :] // per
    scale = max(1, n_img * b * ch)
    return np.where(same, np.inf, lr / scale), np.where(same, np.inf, tb / scale)


class _Board:
    """The placement so far: cell (row, col) -> piece, on a canvas twice the puzzle's size."""

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.grid = np.full((2 * rows + 1, 2 * cols + 1), -1)

    def place(self, cell: tuple[int, int], piece: int) -> None:
        self.grid[cell] = piece

    def frontier(self) -> list[tuple[int, int]]:
        filled = self.grid >= 0
        rs, cs = np.nonzero(filled)
        r0, r1, c0, c1 = rs.min(), rs.max(), cs.min(), cs.max()
        near = np.zeros_like(filled)
        near[1:] |= filled[:-1]
        near[:-1] |= filled[1:]
        near[:, 1:] |= filled[:, :-1]
        near[:, :-1] |= filled[:, 1:]
        cells = []
        for r, c in zip(*np.nonzero(near & ~filled)):
            if max(r1, r) - min(r0, r) < self.rows and max(c1, c) - min(c0, c) < self.cols:
                cells.append((int(r), int(c)))
        return cells

    def trimmed(self) -> np.ndarray:
        rs, cs = np.nonzero(self.grid >= 0)
        return self.grid[rs.min():rs.max() + 1, cs.min():cs.max() + 1]


def _cell_cost(board: _Board, cell: tuple[int, int], lr: np.ndarray, tb: np.ndarray) -> np.ndarray:
    r, c = cell
    g = board.grid
    costs = []
    if c > 0 and g[r, c - 1] >= 0:
        costs.append(lr[g[r, c - 1], :])
    if c + 1 < g.shape[1] and g[r, c + 1] >= 0:
        costs.append(lr[:, g[r, c + 1]])
    if r > 0 and g[r - 1, c] >= 0:
        costs.append(tb[g[r - 1, c], :])
    if r + 1 < g.shape[0] and g[r + 1, c] >= 0:
        costs.append(tb[:, g[r + 1, c]])
    return np.mean(costs, axis=0)


def solve(lr: np.ndarray, tb: np.ndarray, rows: int, cols: int, variants: int = 1) -> np.ndarray:
    """Greedy placement -> (rows, cols) array of pieces (8 * block + restoring code; ``variants``
    as in :func:`dissimilarities`, one of each run of blocks is placed).

    The result is right up to a rotation/flip of the whole puzzle (the caller decides which with
    a prior) and, for a square puzzle, may come out as (cols, rows)."""
    per = NUM_TRANSFORMS * variants
    n = lr.shape[0] // per
    board = _Board(rows, cols)
    if n == 1:
        return np.zeros((1, 1), np.int64)
    first, second = np.unravel_index(np.argmin(lr if cols > 1 else tb), lr.shape)
    board.place((rows, cols), int(first))
    board.place((rows, cols + 1) if cols > 1 else (rows + 1, cols), int(second))
    used = np.zeros(n, bool)
    used[[first // per, second // per]] = True
    for _ in range(n - 2):
        best = None
        for cell in board.frontier():
            cost = np.where(np.repeat(used, per), np.inf, _cell_cost(board, cell, lr, tb))
            per_block = cost.reshape(n, per).min(axis=1)
            two = np.partition(per_block, 1)[:2] if (~used).sum() > 1 else np.array([per_block.min(), np.inf])
            confidence = two[0] / (two[1] + 1e-9) if np.isfinite(two[1]) else 0.0
            if best is None or confidence < best[0]:
                best = (confidence, cell, int(np.argmin(cost)))
        _, cell, piece = best
        board.place(cell, piece)
        used[piece // per] = True
    return board.trimmed()


def mean_picture(mean_blocks: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Mean restored blocks (n, b, b, C) placed as ``grid`` says -> one (rows*b, cols*b, C) picture."""
    rows = [np.concatenate([transform_block(mean_blocks[p // NUM_TRANSFORMS], p % NUM_TRANSFORMS) for p in row],
                           axis=1) for row in grid]
    return np.concatenate(rows, axis=0)


def upright(grid: np.ndarray, mean_blocks: np.ndarray, prior_mean: np.ndarray,
            recolour: list) -> tuple[np.ndarray, int]:
    """Turn (and recolour) the solved puzzle the way its mean picture best matches the prior's mean
    image (sky up, the light where it belongs): 8 turns x each whole-image colour choice."""
    picture = mean_picture(mean_blocks, grid)
    best, best_err, best_k = grid, np.inf, 0
    for k, fix in enumerate(recolour):
        coloured = fix(picture)
        for g in range(NUM_TRANSFORMS):
            turned = transform_block(coloured, g)
            err = float(((turned - prior_mean) ** 2).sum()) if turned.shape == prior_mean.shape else np.inf
            if err < best_err:
                best, best_err, best_k = turned_grid(grid, g), err, k
    return best, best_k


def turned_grid(grid: np.ndarray, g: int) -> np.ndarray:
    """The grid of pieces that shows the whole picture turned by transform code ``g``."""
    moved = transform_block(grid, g)
    return moved // NUM_TRANSFORMS * NUM_TRANSFORMS + COMPOSE[g][moved % NUM_TRANSFORMS]


def assemble(blocks: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(N, n, b, b, C) restored blocks placed as ``grid`` says -> (N, rows*b, cols*b, C)."""
    moved = blocks.transpose(2, 3, 0, 1, 4)  # block axes first: transform_block turns axes 0, 1
    rows = [np.concatenate([transform_block(moved[:, :, :, p // NUM_TRANSFORMS], p % NUM_TRANSFORMS)
                            for p in row], axis=1) for row in grid]
    return np.concatenate(rows, axis=0).transpose(2, 0, 1, 3)


def place(restored: np.ndarray, rows: int, cols: int, prior_mean: np.ndarray,
          recolour: list | None = None, variants: int = 1) -> tuple[np.ndarray, int]:
    """(N, n, b, b, C) restored blocks -> upright (rows, cols) grid of pieces, whole-image colour choice."""
    lr, tb = dissimilarities(restored, variants)
    grid = solve(lr, tb, rows, cols, variants)
    return upright(grid, restored.mean(axis=0, dtype=np.float64), prior_mean, recolour or [lambda x: x])
