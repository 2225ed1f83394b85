"""Key-aware networks: a small input adapter per key id in front of one shared trunk.

Block EtC does two kinds of things to an image: it moves blocks in space (scrambling) and it
transforms each block in place (rotation/flip, negative-positive, colour shuffle). A per-key patch
embedding can absorb only the second kind; the trunk of a ConvMixer or a ViT then still sees every
key's blocks in a different spatial order, which is why such a stem recovers none of the multi-key
gap (``docs/results.md``). For a ViT, a per-key position embedding undoes the scrambling
(:class:`TokenAdapter`). For a ConvMixer (convolutions: translation-, not permutation-equivariant),
:class:`BlockAdapter` is shaped so that it *can* represent the exact inverse of a key, and
nothing much more:

* ``orientation``: per encrypted block position, a soft choice among the 8 rotations/flips;
* ``colour``: per encrypted block position, a channel-mixing matrix and a bias (a channel
  shuffle and a negative-positive flip are a signed permutation in the normalised [-1, 1] space);
* ``placement``: a soft block permutation (Sinkhorn-normalised logits) that moves the blocks to
  a common layout the shared trunk learns on.

It has ``n*n + 8*n + n*(C*C + C)`` parameters for ``n`` blocks (96 per key for 32x32 colour EtC),
and it learns the key's relative schedule into weights: whoever holds an adapter can read the
block order back (``decode_adapter``). That is the price of this strategy; the federated mode keeps
adapters at their owners.

:class:`KeyedModel` routes each image to the adapter of its key id and refuses key ids it has no
adapter for: answering them would be noise.
"""
from __future__ import annotations

import torch
from torch import nn

from models.network import Network, UnknownKeyError

NUM_ORIENTATIONS = 8  # 4 quarter turns x {no flip, flip}


def orient(blocks: torch.Tensor, code: int) -> torch.Tensor:
    """Rotate the last two axes (code mod 4) quarter turns counter-clockwise, then flip
    left-right when code >= 4 (the convention of the owners' cipher)."""
    out = torch.rot90(blocks, k=code % 4, dims=(-2, -1))
    return out.flip(-1) if code >= 4 else out


def sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Doubly stochastic matrix from square logits (log-domain row/column normalisation)."""
    log_p = logits
    for _ in range(iterations):
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True)
    return log_p.exp()


class BlockAdapter(nn.Module):
    """Per-key input adapter for block EtC images (shape in = shape out = (N, C, H, W))."""

    def __init__(self, channels: int, image_shape: tuple[int, int], block: int, sinkhorn_iterations: int = 8,
                 initial_logit: float = 2.0) -> None:
        super().__init__()
        rows, cols = image_shape
        if rows % block or cols % block:
            raise ValueError(f"image {rows}x{cols} is not a multiple of the block size {block}")
        self.channels, self.block, self.grid = channels, block, (rows // block, cols // block)
        self.sinkhorn_iterations = sinkhorn_iterations
        n = self.grid[0] * self.grid[1]
        # placement[j, i]: logit that output position j takes (transformed) encrypted block i.
        # orientation[i, t]: logit of undoing encrypted block i with orient(., t).
        # Both start leaning to "leave the block where and how it is" (the pooled model): starting
        # from "every block everywhere" (all zeros) trained to 34% against pooled's 37% (K=4 IID),
        # because a trunk fed identical blocks everywhere gives the placement no gradient to follow.
        self.placement = nn.Parameter(torch.eye(n) * initial_logit)
        self.orientation = nn.Parameter(torch.zeros(n, NUM_ORIENTATIONS))
        with torch.no_grad():
            self.orientation[:, 0] = initial_logit
        self.colour = nn.Parameter(torch.eye(channels).repeat(n, 1, 1))  # (n, C_out, C_in)
        self.colour_bias = nn.Parameter(torch.zeros(n, channels))

    @property
    def num_blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, n, C, B, B), blocks in row-major order."""
        n_img, c, _, _ = x.shape
        (rows, cols), b = self.grid, self.block
        return x.reshape(n_img, c, rows, b, cols, b).permute(0, 2, 4, 1, 3, 5).reshape(n_img, rows * cols, c, b, b)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n_img, _, c, b, _ = blocks.shape
        rows, cols = self.grid
        grid = blocks.reshape(n_img, rows, cols, c, b, b).permute(0, 3, 1, 4, 2, 5)
        return grid.reshape(n_img, c, rows * b, cols * b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.to_blocks(x)
        weights = self.orientation.softmax(dim=1)  # (n, 8)
        oriented = sum(weights[None, :, t, None, None, None] * orient(blocks, t) for t in range(NUM_ORIENTATIONS))
        coloured = torch.einsum("ncd,mndyx->mncyx", self.colour, oriented) + self.colour_bias[None, :, :, None, None]
        placement = sinkhorn(self.placement, self.sinkhorn_iterations)  # (n_out, n_in)
        placed = torch.einsum("ji,micyx->mjcyx", placement, coloured)
        return self.from_blocks(placed)

    @torch.no_grad()
    def set_exact(self, place: torch.Tensor, orientation: torch.Tensor, colour: torch.Tensor, sharpness: float = 30.0):
        """Set the adapter to a hard transform: encrypted block i goes to position place[i], after
        orient(., orientation[i]) and the channel map colour[i] (C x C). Used to check that the
        adapter can represent a key's inverse exactly."""
        n = self.num_blocks
        self.placement.fill_(-sharpness)
        self.placement[place, torch.arange(n)] = sharpness
        self.orientation.fill_(-sharpness)
        self.orientation[torch.arange(n), orientation] = sharpness
        self.colour.copy_(colour)
        self.colour_bias.zero_()


@torch.no_grad()
def decode_adapter(adapter: BlockAdapter) -> dict[str, torch.Tensor]:
    """What anyone holding the adapter reads from it: per encrypted block i, the output position it
    is sent to, its orientation code, and its channel map rounded to a signed permutation."""
    placement = sinkhorn(adapter.placement, adapter.sinkhorn_iterations)
    n = adapter.num_blocks
    place = torch.full((n,), -1, dtype=torch.long)  # greedy assignment: a permutation even for ties
    taken = torch.zeros(n, dtype=torch.bool)
    for flat in placement.flatten().argsort(descending=True, stable=True).tolist():
        j, i = divmod(flat, n)
        if place[i] < 0 and not taken[j]:
            place[i], taken[j] = j, True
    colour = adapter.colour
    source_channel = colour.abs().argmax(dim=2)  # (n, C_out): which input channel feeds each output
    sign = torch.gather(colour, 2, source_channel[..., None]).squeeze(-1).sign()
    return {"place": place, "orientation": adapter.orientation.argmax(dim=1),
            "source_channel": source_channel, "sign": sign}


class TokenAdapter(nn.Module):
    """Per-key ViT input: its own position embedding, which can absorb block scrambling exactly (a
    ViT is permutation-equivariant apart from it), and its own patch embedding. Patch = EtC block.
    The patch embedding is one linear map for all of the key's blocks, so it absorbs only what is
    common to them; EtC's rotation, negative-positive and channel shuffle differ from block to
    block (undoing them exactly takes a patch embedding per block position: n times the
    parameters). (N, C, H, W) -> (N, n, dim) tokens."""

    def __init__(self, channels: int, image_shape: tuple[int, int], block: int, dim: int) -> None:
        super().__init__()
        rows, cols = image_shape
        self.block, self.grid = block, (rows // block, cols // block)
        self.proj = nn.Conv2d(channels, dim, kernel_size=block, stride=block)
        self.position = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class ViTTrunk(nn.Module):
    """A timm VisionTransformer from its tokens on: class token, blocks, head. Its own patch and
    position embeddings are dropped (each key brings its own)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        vit.patch_embed = nn.Identity()
        vit.pos_embed = None
        self.vit = vit

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.vit
        prefix = [t.expand(len(tokens), -1, -1) for t in (v.cls_token, v.reg_token) if t is not None]
        x = torch.cat([*prefix, tokens], dim=1)  # the position is already in the key's tokens
        x = v.norm_pre(v.patch_drop(x))
        return v.forward_head(v.norm(v.blocks(x)))


class KeyedModel(Network):
    """One adapter per key id, one shared trunk. ``forward(x, key_index)`` with key_index an int
    tensor of positions in ``key_ids``."""

    def __init__(self, trunk: nn.Module, key_ids: list[str], make_adapter) -> None:
        super().__init__()
        if not key_ids:
            raise ValueError("a keyed model needs at least one key id")
        self.key_ids = list(key_ids)
        self.adapters = nn.ModuleList(make_adapter() for _ in self.key_ids)
        self.trunk = trunk

    def route(self, key_id: str | None) -> int | None:
        return self.key_ids.index(key_id) if key_id in self.key_ids else None

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def adapt(self, x: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
        if key_index.shape != (x.shape[0],):
            raise ValueError(f"need one key index per image: {tuple(key_index.shape)} for {x.shape[0]} images")
        bad = (key_index < 0) | (key_index >= len(self.adapters))
        if bool(bad.any()):
            raise UnknownKeyError(f"key index {int(key_index[bad][0])} has no adapter (this model has "
                                  f"{len(self.adapters)})")
        out = None
        for k in key_index.unique().tolist():
            rows = key_index == k
            adapted = self.adapters[k](x[rows])
            if out is None:  # adapters may change the shape (a ViT's adapters return tokens)
                out = adapted.new_empty((x.shape[0], *adapted.shape[1:]))
            out[rows] = adapted.to(out.dtype)
        return out

    def forward(self, x: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.adapt(x, key_index.to(x.device)))


def key_adapter_model(trunk: nn.Module, key_ids: list[str], channels: int, image_shape: tuple[int, int],
                      block: int) -> KeyedModel:
    """ConvMixer (or any image-in trunk): a BlockAdapter per key. ViT: per-key patch and position
    embeddings in front of the shared transformer."""
    if hasattr(trunk, "patch_embed") and hasattr(trunk, "blocks"):  # a timm ViT
        dim = trunk.embed_dim
        return KeyedModel(ViTTrunk(trunk), key_ids, lambda: TokenAdapter(channels, image_shape, block, dim))
    return KeyedModel(trunk, key_ids, lambda: BlockAdapter(channels, image_shape, block))
