"""Key leakage through key adapters: how much of a key's schedule can the holder of the adapters read?

An adapter that lets a shared trunk learn must bring every key's blocks to one common layout, so
the adapters of two keys together spell out how one key's blocks map onto the other's. Whoever
holds both adapters (the cloud, in the ``key-adapters`` strategy) and learns one owner's key, or a
single plain/encrypted image pair of one owner, can then undo every other owner's key.

``relative_recovery`` measures that with the true schedules (which only this experiment knows):
for every pair of keys and every plain block position, does the adapters' relative map agree with
the true relative map? Chance is 1/n for the block order (n blocks).
"""
from __future__ import annotations

import itertools

import numpy as np

from models.keyed import BlockAdapter, TokenAdapter, decode_adapter
from owners.cipher import CHANNEL_ORDERS, BlockSchedule, transform_block


def _orient(grid: np.ndarray, code: int) -> np.ndarray:
    out = np.rot90(grid, k=code % 4)
    return out[:, ::-1] if code >= 4 else out


def composites(adapter: BlockAdapter, schedule: BlockSchedule) -> list[tuple]:
    """Per plain block position p: (where the adapter puts it, the pixel order it ends in, the
    signed channel map it ends with) = the adapter composed with the key's true encryption."""
    d = decode_adapter(adapter)
    grid = np.arange(adapter.block ** 2).reshape(adapter.block, adapter.block)
    out = [None] * len(schedule.source)
    for i, p in enumerate(np.asarray(schedule.source)):
        pixels = _orient(transform_block(grid[..., None], int(schedule.transform[i]))[..., 0],
                         int(d["orientation"][i]))
        negate = -1 if schedule.negate[i] else 1
        order = CHANNEL_ORDERS[int(schedule.channel_order[i])] if schedule.channel_order is not None else (0,)
        colour = tuple((order[int(src)], int(sign) * negate)
                       for src, sign in zip(d["source_channel"][i], d["sign"][i]))
        out[int(p)] = (int(d["place"][i]), pixels.tobytes(), colour)
    return out


def relative_recovery(adapters: list[BlockAdapter], schedules: list[BlockSchedule]) -> dict:
    """Fraction of (key pair, block) whose relative block order / whole block transform the
    adapters reveal; and how often an adapter alone is the exact inverse (absolute recovery)."""
    comps = [composites(a, s) for a, s in zip(adapters, schedules)]
    n = len(comps[0])
    order_hits, full_hits, pairs = 0, 0, 0
    for a, b in itertools.combinations(comps, 2):
        for p in range(n):
            order_hits += a[p][0] == b[p][0]
            full_hits += a[p] == b[p]
        pairs += 1
    identity = np.arange(adapters[0].block ** 2).reshape(adapters[0].block, adapters[0].block).tobytes()
    absolute = np.mean([c[p][0] == p and c[p][1] == identity and all(src == o and sign == 1 for o, (src, sign) in
                                                                      enumerate(c[p][2]))
                        for c in comps for p in range(n)])
    return {"blocks": n, "chance_order": 1 / n,
            "relative_order": order_hits / (pairs * n) if pairs else None,
            "relative_full": full_hits / (pairs * n) if pairs else None,
            "absolute_full": float(absolute)}


def relative_order_from_positions(adapters: list[TokenAdapter], schedules: list[BlockSchedule]) -> dict:
    """ViT: match each key's position embeddings to another key's by cosine similarity (greedy,
    most similar pairs first) and score the implied relative block order against the truth."""
    import torch

    hits, total = 0, 0
    for (pa, sa), (pb, sb) in itertools.combinations(zip(adapters, schedules), 2):
        a = torch.nn.functional.normalize(pa.position[0].detach(), dim=1)
        b = torch.nn.functional.normalize(pb.position[0].detach(), dim=1)
        n = len(a)
        match, used = [-1] * n, set()
        for flat in (a @ b.T).flatten().argsort(descending=True).tolist():
            i, j = divmod(flat, n)
            if match[i] < 0 and j not in used:
                match[i] = j
                used.add(j)
        inverse_b = np.argsort(np.asarray(sb.source))  # plain position -> encrypted position under b
        for i in range(n):
            hits += match[i] == int(inverse_b[int(sa.source[i])])
            total += 1
    n = len(adapters[0].position[0])
    return {"blocks": n, "chance_order": 1 / n, "relative_order": hits / total if total else None,
            "relative_full": None, "absolute_full": None}
