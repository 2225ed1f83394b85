"""From the store to tensors: which shards train, a torch dataset over them, batch augmentation.

Everything here is plain torch and numpy (no Ray): the training loop uses it on a laptop or inside
a Ray Train worker alike. Images stay encoded in memory (about 1 KB each at 32x32) and are
decoded per sample; pixels are normalised as (x/255 - 0.5)/0.5 so that negative-positive blocks
become an exact sign flip (paper, Eq. 7).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from owners.shards import decode, iter_samples  # the shared file format; no key material


@dataclass(frozen=True)
class ShardRef:
    """One stored shard and whose data it is (the plan handed to training workers)."""

    path: str  # object file in the store (a shared filesystem on multi-node clusters)
    owner: str
    key_id: str | None  # None for plain data
    split: str  # train | test
    images: int


@dataclass(frozen=True)
class Geometry:
    """Model input geometry for a task: colour/plain (3, S, S); gray EtC (1, S, 3S)."""

    image_size: int
    block_size: int | None  # None for plain
    scheme: str

    @property
    def in_chans(self) -> int:
        return 1 if self.scheme == "gray" else 3

    @property
    def shape(self) -> tuple[int, int]:
        return (self.image_size, 3 * self.image_size) if self.scheme == "gray" else (self.image_size, self.image_size)


def plan_from_catalog(datasets: list[dict], object_path) -> list[ShardRef]:
    """ShardRefs of committed datasets (rows of ``ShardStore.committed_datasets``)."""
    refs = []
    for d in datasets:
        for shard in d["manifest"]["shards"]:
            refs.append(ShardRef(str(object_path(shard["sha256"])), d["owner"], d["key_id"], d["split"], shard["count"]))
    return refs


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


# --------------------------------------------------------------------------- augmentation


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """The usual CIFAR augmentation, for plain baselines only: it breaks an EtC block grid."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def partners(groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random partner for each image among the images of the same group (key id)."""
    perm = torch.arange(len(groups))
    for g in groups.unique():
        rows = (groups == g).nonzero().squeeze(1)
        perm[rows] = rows[torch.randperm(len(rows), generator=generator)]
    return perm


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float, perm: torch.Tensor, generator: torch.Generator):
    """Blend each image with its partner ``x[perm]``; block-preserving (pixel-wise blend)."""
    lam = float(torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample())
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def block_cutmix(x: torch.Tensor, targets: torch.Tensor, block: int, perm: torch.Tensor, generator: torch.Generator):
    """CutMix with partner ``x[perm]`` in a rectangle on the EtC block grid, so no block is split."""
    _, _, h, w = x.shape
    rows, cols = h // block, w // block
    r0, c0 = int(torch.randint(0, rows, (1,), generator=generator)), int(torch.randint(0, cols, (1,), generator=generator))
    r1 = int(torch.randint(r0 + 1, rows + 1, (1,), generator=generator))
    c1 = int(torch.randint(c0 + 1, cols + 1, (1,), generator=generator))
    out = x.clone()
    out[:, :, r0 * block:r1 * block, c0 * block:c1 * block] = x[perm, :, r0 * block:r1 * block, c0 * block:c1 * block]
    lam = 1 - (r1 - r0) * (c1 - c0) / (rows * cols)
    return out, lam * targets + (1 - lam) * targets[perm]
