"""Batch augmentation that respects the EtC block grid, and the per-batch preparation of training.

Mixing partners always share a key (group): an image blended across keys fits no key's adapter.
Spatial augmentation (random crop and flip) would cut through blocks, so it is for plain data only.
"""
from __future__ import annotations

import torch

from mlcore.data import normalise
from mlcore.settings import TrainSettings
from protocol.task import Task


def augment_batch(images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, settings: TrainSettings,
                  task: Task, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and augment one training batch; targets are soft (mixup/CutMix mix them)."""
    x = normalise(images.to(device, non_blocking=True))
    targets = torch.nn.functional.one_hot(labels.to(device), len(task.classes)).float()
    block = task.model_input.block_size
    if not task.encrypted:
        x = random_crop_flip(x, pad=4, generator=generator)
    if settings.mixup_alpha > 0 or settings.cutmix_prob > 0:
        if block and torch.rand(1, generator=generator).item() < settings.cutmix_prob:
            x, targets = block_cutmix(x, targets, block, partners(groups, generator), generator)
        elif settings.mixup_alpha > 0:
            x, targets = mixup(x, targets, settings.mixup_alpha, partners(groups, generator), generator)
    return x.contiguous(memory_format=torch.channels_last), targets


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
    r0 = int(torch.randint(0, rows, (1,), generator=generator))
    c0 = int(torch.randint(0, cols, (1,), generator=generator))
    r1 = int(torch.randint(r0 + 1, rows + 1, (1,), generator=generator))
    c1 = int(torch.randint(c0 + 1, cols + 1, (1,), generator=generator))
    out = x.clone()
    out[:, :, r0 * block:r1 * block, c0 * block:c1 * block] = x[perm, :, r0 * block:r1 * block, c0 * block:c1 * block]
    lam = 1 - (r1 - r0) * (c1 - c0) / (rows * cols)
    return out, lam * targets + (1 - lam) * targets[perm]
