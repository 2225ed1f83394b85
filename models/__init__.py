"""Isotropic networks for EtC images (timm-based). Importing this package registers the variants.

:func:`build_model` is the one way the product makes a network: it checks that the network's
patch fits the EtC block grid (patch divides the block; for ViT, patch equals the block, so each
token is exactly one block) before anything trains.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from models import convmixer, vit  # noqa: F401 - registers the variants with timm


class ModelConfigError(ValueError):
    pass


def patch_size_of(model: torch.nn.Module) -> int:
    if hasattr(model, "patch_embed"):  # ViT
        return int(model.patch_embed.patch_size[0])
    return int(model.stem[0].kernel_size[0])  # ConvMixer


def build_model(name: str, num_classes: int, image_size: tuple[int, int], in_chans: int = 3,
                block_size: int | None = None, pretrained_file: Path | None = None) -> torch.nn.Module:
    """Create ``name`` for images of ``image_size`` (rows, cols) and check it against the block grid.

    ``block_size`` is None for plain images. ``pretrained_file``: local weights (timm's own
    loader; the classifier head is re-initialised when the class count differs).
    """
    if name not in timm.list_models():
        raise ModelConfigError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if "vit" in name:
        kwargs["img_size"] = image_size
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise ModelConfigError(f"pretrained weights file {pretrained_file} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    model = timm.create_model(name, **kwargs)
    patch = patch_size_of(model)
    rows, cols = image_size
    if rows % patch or cols % patch:
        raise ModelConfigError(f"{name}: patch size {patch} does not divide the image size {rows}x{cols}")
    if block_size is not None:
        if hasattr(model, "patch_embed") and patch != block_size:
            raise ModelConfigError(f"{name}: a ViT's patch ({patch}) must equal the EtC block size ({block_size})")
        if block_size % patch:
            raise ModelConfigError(f"{name}: patch size {patch} does not divide the EtC block size {block_size}")
    return model


def list_models() -> list[str]:
    """The product's variants (any other timm name works too, e.g. vit_base_patch16_224)."""
    return sorted(timm.list_models("convmixer_*_p*_k*") + timm.list_models("vit_[0-9][0-9]*_*_p*_*"))
