"""ConvMixer variants for EtC images, registered with timm under names that spell them out.

``convmixer_<dim>_<depth>_p<patch>_k<kernel>``: hidden width, number of mixer blocks, patch size
(the stem's kernel and stride) and depthwise kernel size, all in pixels or channels.
Built through timm's own factory (``build_model_with_cfg``), so ``timm.create_model(name,
pretrained=True, pretrained_cfg_overlay={"file": ...})`` loads local weights like any timm model.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convmixer import ConvMixer


def _cfg(image_size: int) -> dict:
    # No published weights (url ""): weights only ever come from a local file the user names.
    return {"url": "", "num_classes": 1000, "input_size": (3, image_size, image_size), "crop_pct": 1.0,
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "stem.0", "classifier": "head"}


# timm's register_model reads this module's `default_cfgs` to give each variant its pretrained cfg.
default_cfgs = generate_default_cfgs({
    "convmixer_256_8_p1_k9": _cfg(32),
    "convmixer_256_8_p2_k9": _cfg(32),
    "convmixer_256_8_p4_k9": _cfg(32),
    "convmixer_384_8_p4_k9": _cfg(224),
})


def _create(variant: str, pretrained: bool, dim: int, depth: int, patch: int, kernel: int, **kwargs) -> ConvMixer:
    kwargs.pop("img_size", None)  # fully convolutional: any image size a patch divides
    return build_model_with_cfg(ConvMixer, variant, pretrained, dim=dim, depth=depth, patch_size=patch,
                                kernel_size=kernel, **kwargs)


@register_model
def convmixer_256_8_p1_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    """The paper's CIFAR-10 model (92.72% on colour EtC); ~8 images/s on 2 CPU cores: a GPU model."""
    return _create("convmixer_256_8_p1_k9", pretrained, 256, 8, 1, 9, **kwargs)


@register_model
def convmixer_256_8_p2_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    return _create("convmixer_256_8_p2_k9", pretrained, 256, 8, 2, 9, **kwargs)


@register_model
def convmixer_256_8_p4_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    """CPU-sized: ~234 images/s on 2 cores at 32x32 (3.6 min per CIFAR-10 epoch)."""
    return _create("convmixer_256_8_p4_k9", pretrained, 256, 8, 4, 9, **kwargs)


@register_model
def convmixer_384_8_p4_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    """The paper's Imagenette model (224x224)."""
    return _create("convmixer_384_8_p4_k9", pretrained, 384, 8, 4, 9, **kwargs)
