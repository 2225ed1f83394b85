"""Isotropic networks for EtC images (timm-based). Importing this package registers the variants.

:func:`build_model` is the one way the product makes a timm network: it checks that the
network's patch fits the EtC block grid (patch divides the block; for ViT, patch equals the block,
so each token is exactly one block) before anything trains. :func:`build_network` puts it behind
the product's one network interface (``models/network.py``): shared by every key, or with one
adapter per key id (``models/keyed.py``).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import get_pretrained_cfg

from models import convmixer, invariant, vit  # noqa: F401 - importing them registers the variants with timm
from models.keyed import key_adapter_model
from models.network import SHARED_PREFIX, Network, SharedInputModel, UnknownKeyError

__all__ = ["SHARED_PREFIX", "ModelConfigError", "Network", "UnknownKeyError", "build_model", "build_network",
           "list_models", "patch_size_of"]


class ModelConfigError(ValueError):
    pass


def patch_size_of(model: torch.nn.Module) -> int:
    if isinstance(model, invariant.InvariantNet):  # its patch tiles one EtC block
        return model.patch
    if hasattr(model, "patch_embed"):  # ViT
        return int(model.patch_embed.patch_size[0])
    return int(model.stem[0].kernel_size[0])  # ConvMixer


def _takes_image_size(name: str) -> bool:
    """Whether the network is built for one input size (a ViT's position table), by its timm cfg."""
    cfg = get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


def build_model(name: str, num_classes: int, image_size: tuple[int, int], in_chans: int = 3,
                block_size: int | None = None, pretrained_file: Path | None = None) -> torch.nn.Module:
    """Create ``name`` for images of ``image_size`` (rows, cols) and check it against the block grid.

    ``block_size`` is None for plain images. ``pretrained_file``: local weights, loaded by timm's
    own loader for every variant (the classifier head is re-initialised when the class count differs).
    """
    if name not in timm.list_models():
        raise ModelConfigError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if invariant.is_invariant(name):  # it works block by block: it needs the EtC block size
        if block_size is None:
            raise ModelConfigError(f"{name} works on EtC blocks; plain images (no task.block_size) have none")
        kwargs["block_size"] = block_size
    if _takes_image_size(name):
        kwargs["img_size"] = image_size
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise ModelConfigError(f"pretrained weights file {pretrained_file} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    model = timm.create_model(name, **kwargs)
    _check_patch(name, patch_size_of(model), image_size, block_size, vit_like=hasattr(model, "patch_embed"))
    return model


def _check_patch(name: str, patch: int, image_size: tuple[int, int], block_size: int | None, vit_like: bool) -> None:
    rows, cols = image_size
    if rows % patch or cols % patch:
        raise ModelConfigError(f"{name}: patch size {patch} does not divide the image size {rows}x{cols}")
    if block_size is not None:
        if vit_like and patch != block_size:
            raise ModelConfigError(f"{name}: a ViT's patch ({patch}) must equal the EtC block size ({block_size})")
        if block_size % patch:
            raise ModelConfigError(f"{name}: patch size {patch} does not divide the EtC block size {block_size}")


def build_network(model: str, num_classes: int, model_input, key_ids: list[str] | None,
                  pretrained_file: Path | None = None) -> Network:
    """The product's network: ``model`` as a trunk shared by every key (``key_ids`` None), or
    behind one adapter per key id. ``model_input`` is a ``protocol.task.ModelInput``."""
    g = model_input
    trunk = build_model(model, num_classes, g.shape, g.in_chans, g.block_size, pretrained_file)
    if key_ids is None:
        return SharedInputModel(trunk)
    return key_adapter_model(trunk, key_ids, g.in_chans, g.shape, g.block_size)


def list_models() -> list[str]:
    """The product's variants (any other timm name works too, e.g. vit_base_patch16_224)."""
    return sorted(timm.list_models("convmixer_*_p*_k*") + timm.list_models("vit_[0-9][0-9]*_*_p*_*")
                  + timm.list_models("invariant_*"))
