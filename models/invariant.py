"""Networks that need no key: their output is invariant to every EtC key (strategy ``per-image-keys``).

When every image is encrypted under its own fresh key, nothing about a block's position,
orientation (8 rotations/flips), polarity (negative-positive) or channel order (6, colour) carries
over from one image to the next; a network can only use what survives all of them. This family is
built so that it uses exactly that, and its logits are the same for an image under any key:

1. **canonical blocks**: each EtC block is mapped to one representative of its orbit under the
   per-block transforms: negated when its mean is below mid-grey (in [-1, 1]: below 0), channels
   sorted by their mean (colour), then the one of its 8 orientations that maximises a fixed,
   generic linear functional (a brightness-centroid ramp plus a small fixed random pattern that
   breaks the ramp's ties). The three steps commute with the cipher's (which act on space,
   values and channels separately), so the representative is the same whatever the key chose;
2. **a shared block encoder**: a small ConvMixer on one canonical block, the same weights for
   every block, pooled to one vector per block;
3. **an order-free mixer**: blocks are a set; ``mean`` averages their vectors, ``attn<L>`` first
   runs L transformer layers without any position embedding (self-attention is
   permutation-equivariant), then averages.

What the canonical form throws away is what the key hides anyway: each block's absolute brightness
polarity (a bright block and its negative look alike), its hue up to a channel permutation (a red
and a blue block with the same texture look alike), its orientation and its place in the image.

Variants register with timm as ``invariant_<dim>_<depth>_p<patch>_k<kernel>_<mixer>``: the block
encoder's width, depth, patch and depthwise kernel, and the mixer. The EtC block size is not part
of the name: ``models.build_model`` passes the task's (``block_size``).
"""
from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from models.keyed import NUM_ORIENTATIONS, orient

TIE_BREAK_SCALE = 1e-3  # the random part of the orientation functional, against the ramp's weight ~1
TIE_BREAK_SEED = 0  # fixed: the functional is part of the model's definition (stored as a buffer too)


def orientation_functional(block: int) -> torch.Tensor:
    """(block, block) weights whose inner product with a block's 8 orientations is, for a generic
    block, different for each (a ramp with unequal slopes plus a small fixed random pattern)."""
    centred = torch.arange(block, dtype=torch.float32) - (block - 1) / 2
    ramp = (centred[:, None] + 0.5 * centred[None, :]) / block
    noise = torch.randn(block, block, generator=torch.Generator().manual_seed(TIE_BREAK_SEED))
    return ramp + TIE_BREAK_SCALE * noise


def split_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, n, C, block, block), blocks in row-major order."""
    n_img, c, h, w = x.shape
    rows, cols = h // block, w // block
    grid = x.reshape(n_img, c, rows, block, cols, block).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(n_img, rows * cols, c, block, block)


def canonical_blocks(blocks: torch.Tensor, functional: torch.Tensor) -> torch.Tensor:
    """(M, C, B, B) blocks in [-1, 1] -> the same blocks in canonical polarity, channel order and
    orientation (see the module docstring)."""
    mean = blocks.mean(dim=(1, 2, 3), keepdim=True)
    blocks = torch.where(mean < 0, -blocks, blocks)
    if blocks.shape[1] > 1:
        order = blocks.mean(dim=(2, 3)).argsort(dim=1)  # (M, C): darkest channel first
        blocks = torch.gather(blocks, 1, order[:, :, None, None].expand_as(blocks))
    variants = torch.stack([orient(blocks, t) for t in range(NUM_ORIENTATIONS)], dim=1)  # (M, 8, C, B, B)
    score = (variants.sum(dim=2) * functional).sum(dim=(-2, -1))  # (M, 8)
    pick = score.argmax(dim=1)
    return variants[torch.arange(len(blocks), device=blocks.device), pick]


def block_norm(dim: int) -> nn.Module:
    """BatchNorm, as in ConvMixer. GroupNorm (the same computation in training and evaluation) did not
    learn at all in a short schedule (600 images, 27 steps: loss 2.33, 11%); BatchNorm did (22% with
    batch statistics) but then lagged in eval mode (10%): a schedule that short is not the budget."""
    return nn.BatchNorm2d(dim)


class BlockEncoder(nn.Module):
    """A ConvMixer on one block: (M, C, B, B) -> (M, dim)."""

    def __init__(self, in_chans: int, dim: int, depth: int, patch: int, kernel: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, patch, stride=patch), nn.GELU(), block_norm(dim))
        self.mixing = nn.ModuleList(nn.ModuleDict({
            "spatial": nn.Sequential(nn.Conv2d(dim, dim, kernel, groups=dim, padding="same"), nn.GELU(),
                                     block_norm(dim)),
            "channel": nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), block_norm(dim)),
        }) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.mixing:
            x = layer["channel"](x + layer["spatial"](x))
        return x.mean(dim=(2, 3))


class InvariantNet(nn.Module):
    """Canonical blocks -> shared block encoder -> order-free mixer -> classifier (module docstring)."""

    def __init__(self, block_size: int, num_classes: int = 1000, in_chans: int = 3, dim: int = 256, depth: int = 8,
                 patch: int = 2, kernel: int = 5, attention_layers: int = 0, heads: int = 4) -> None:
        super().__init__()
        if block_size % patch:
            raise ValueError(f"patch size {patch} does not divide the EtC block size {block_size}")
        self.block_size, self.patch, self.num_classes = block_size, patch, num_classes
        self.register_buffer("functional", orientation_functional(block_size))
        self.encoder = BlockEncoder(in_chans, dim, depth, patch, kernel)
        self.mixer = nn.TransformerEncoder(  # no position embedding anywhere: the blocks are a set
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True), attention_layers, enable_nested_tensor=False,
        ) if attention_layers else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = split_blocks(x, self.block_size)  # (N, n, C, B, B)
        n_img, n = blocks.shape[:2]
        canonical = canonical_blocks(blocks.reshape(n_img * n, *blocks.shape[2:]), self.functional)
        features = self.encoder(canonical.contiguous()).reshape(n_img, n, -1)
        return self.head(self.mixer(features).mean(dim=1))


def _cfg() -> dict:
    # No published weights (url ""): weights only ever come from a local file the user names.
    return {"url": "", "num_classes": 1000, "input_size": (3, 32, 32), "crop_pct": 1.0,
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "encoder.stem.0", "classifier": "head"}


# timm's register_model reads this module's `default_cfgs` to give each variant its pretrained cfg.
default_cfgs = generate_default_cfgs({name: _cfg() for name in (
    "invariant_128_6_p2_k5_mean", "invariant_256_8_p2_k5_mean", "invariant_256_8_p2_k5_attn2",
    "invariant_256_8_p4_k3_attn2",
)})


def _create(variant: str, pretrained: bool, **kwargs) -> InvariantNet:
    kwargs.pop("img_size", None)  # any image size the block divides
    if "block_size" not in kwargs:
        raise ValueError(f"{variant} needs the EtC block size (block_size=...): it works on EtC blocks")
    return build_model_with_cfg(InvariantNet, variant, pretrained, **kwargs)


@register_model
def invariant_128_6_p2_k5_mean(pretrained: bool = False, **kwargs) -> InvariantNet:
    return _create("invariant_128_6_p2_k5_mean", pretrained, dim=128, depth=6, patch=2, kernel=5, **kwargs)


@register_model
def invariant_256_8_p2_k5_mean(pretrained: bool = False, **kwargs) -> InvariantNet:
    return _create("invariant_256_8_p2_k5_mean", pretrained, dim=256, depth=8, patch=2, kernel=5, **kwargs)


@register_model
def invariant_256_8_p2_k5_attn2(pretrained: bool = False, **kwargs) -> InvariantNet:
    return _create("invariant_256_8_p2_k5_attn2", pretrained, dim=256, depth=8, patch=2, kernel=5,
                   attention_layers=2, **kwargs)


@register_model
def invariant_256_8_p4_k3_attn2(pretrained: bool = False, **kwargs) -> InvariantNet:
    return _create("invariant_256_8_p4_k3_attn2", pretrained, dim=256, depth=8, patch=4, kernel=3,
                   attention_layers=2, **kwargs)


def is_invariant(model_name: str) -> bool:
    """Whether ``model_name`` is one of this family (the only models strategy per-image-keys accepts)."""
    return model_name.startswith("invariant_")
