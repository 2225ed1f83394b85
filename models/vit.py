"""ViT variants for EtC images: the patch size must equal the EtC block size.

``vit_<width>_<depth>_p<patch>_<image>``: embedding width, transformer blocks, patch size and
image side in pixels. ``vit_base_patch16_224`` (timm's ViT-B/16) is used as is; its pretrained
weights come from a local file (``pretrained_file``), never from the network.
"""
from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from models.common import constructor_kwargs


def _vit(width: int, depth: int, heads: int, patch: int, image: int, **kwargs) -> VisionTransformer:
    kwargs = constructor_kwargs(VisionTransformer, kwargs)  # drop timm's loader options (no weights)
    kwargs.setdefault("img_size", image)
    return VisionTransformer(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
                             class_token=True, global_pool="token", **kwargs)


@register_model
def vit_192_6_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized ViT for 32x32 images with 4-pixel blocks (64 patches)."""
    return _vit(192, 6, 3, 4, 32, **kwargs)


@register_model
def vit_192_6_p8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized ViT for 32x32 images with 8-pixel blocks (16 patches; gray EtC's block)."""
    return _vit(192, 6, 3, 8, 32, **kwargs)


@register_model
def vit_192_6_p16_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized ViT for 32x32 images with colour EtC's 16-pixel blocks (4 patches: one per block)."""
    return _vit(192, 6, 3, 16, 32, **kwargs)
