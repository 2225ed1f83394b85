"""From shards to tensors: which shards train, and a torch dataset over them.

Everything here is plain torch and numpy (no Ray): the training loop uses it on a laptop or inside
a Ray Train worker alike. Images stay encoded in memory (about 1 KB each at 32x32) and are
decoded per sample; pixels are normalised as (x/255 - 0.5)/0.5 so that a negative-positive block
(p XOR 255 = 255 - p) becomes a sign flip, up to float rounding (``docs/design.md``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.codec import decode
from protocol.shards import Manifest, ShardInfo, iter_samples


@dataclass(frozen=True)
class ShardRef:
    """One stored shard and whose data it is (the plan handed to training workers)."""

    path: str  # object file in the store (a shared filesystem on multi-node clusters)
    owner: str
    key_id: str | None  # None for plain data
    split: str  # train | test
    images: int


def shard_refs(shards: Iterable[ShardInfo], locate: Callable[[ShardInfo], Path], owner: str, key_id: str | None,
               split: str) -> tuple[ShardRef, ...]:
    """ShardRefs of one dataset's shards; ``locate`` says where each shard's file is."""
    return tuple(ShardRef(str(locate(s)), owner, key_id, split, s.count) for s in shards)


def outbox_refs(folder: Path, owner: str, split: str | None = None) -> tuple[ShardRef, ...]:
    """ShardRefs of an outbox folder (manifest.json + shards), as ``owner``; split from the manifest."""
    m = Manifest.load(Path(folder))
    return shard_refs(m.shards, lambda s: Path(folder) / s.name, owner, m.key_id, split or m.split)


class EncodedImages(torch.utils.data.Dataset):
    """Samples of some shards: (uint8 tensor C x H x W, label, group), group = index of its key id
    (or owner, for plain data) in ``groups``."""

    def __init__(self, shards: list[ShardRef], groups: list[str]) -> None:
        self.encoded: list[bytes] = []
        labels, group_ids = [], []
        for ref in shards:
            group = groups.index(ref.key_id or ref.owner)
            for _, data, label in iter_samples(Path(ref.path)):
                self.encoded.append(data)
                labels.append(label)
                group_ids.append(group)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.groups = torch.tensor(group_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int):
        img = decode(self.encoded[i])
        img = img[None] if img.ndim == 2 else np.ascontiguousarray(img.transpose(2, 0, 1))
        return torch.from_numpy(img), self.labels[i], self.groups[i]


def group_names(shards: list[ShardRef]) -> list[str]:
    """Stable list of key ids (or owners for plain data): the group index used everywhere."""
    return sorted({ref.key_id or ref.owner for ref in shards})


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)
