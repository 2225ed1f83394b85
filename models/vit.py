"""ViT variants for EtC images: the patch size must equal the EtC block size.

``vit_<width>_<depth>_p<patch>_<image>``: embedding width, transformer blocks, patch size and
image side in pixels. ``vit_base_patch16_224`` (timm's ViT-B/16) is used as is. Every variant is
built through timm's own factory, so weights load from a local file (``pretrained_file``) with
timm's ViT checkpoint filter (position embeddings resampled when the grid differs); nothing is
ever downloaded.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn


def _cfg(image_size: int) -> dict:
    # fixed_input_size: timm passes img_size to the constructor (a ViT's position table has one
    # entry per patch). No published weights: url "".
    return {"url": "", "num_classes": 1000, "input_size": (3, image_size, image_size), "fixed_input_size": True,
            "crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "patch_embed.proj",
            "classifier": "head"}


default_cfgs = generate_default_cfgs({  # read by timm's register_model
    "vit_192_6_p4_32": _cfg(32),
    "vit_192_6_p8_32": _cfg(32),
    "vit_192_6_p16_32": _cfg(32),
})


def _create(variant: str, pretrained: bool, width: int, depth: int, heads: int, patch: int,
            **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0,
                                class_token=True, global_pool="token", **kwargs)


@register_model
def vit_192_6_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized ViT for 32x32 images with 4-pixel blocks (64 patches)."""
    return _create("vit_192_6_p4_32", pretrained, 192, 6, 3, 4, **kwargs)


@register_model
def vit_192_6_p8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized ViT for 32x32 images with 8-pixel blocks (16 patches; gray EtC's block)."""
    return _create("vit_192_6_p8_32", pretrained, 192, 6, 3, 8, **kwargs)


@register_model
def vit_192_6_p16_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized ViT for 32x32 images with colour EtC's 16-pixel blocks (4 patches: one per block)."""
    return _create("vit_192_6_p16_32", pretrained, 192, 6, 3, 16, **kwargs)
