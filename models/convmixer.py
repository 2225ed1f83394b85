"""ConvMixer variants for EtC images, registered with timm under names that spell them out.

``convmixer_<dim>_<depth>_p<patch>_k<kernel>``: hidden width, number of mixer blocks, patch size
(the stem's kernel and stride) and depthwise kernel size, all in pixels or channels.
Build with ``timm.create_model(name, num_classes=..., in_chans=...)`` once ``models`` is imported.
"""
from __future__ import annotations

from timm.models import register_model
from timm.models.convmixer import ConvMixer

from models.common import constructor_kwargs


def _convmixer(dim: int, depth: int, patch: int, kernel: int, **kwargs) -> ConvMixer:
    # timm's factory also passes loader options (pretrained_cfg, cache_dir, ...): these variants
    # have no published weights, so only the constructor's own arguments are kept.
    return ConvMixer(dim=dim, depth=depth, kernel_size=kernel, patch_size=patch, **constructor_kwargs(ConvMixer, kwargs))


@register_model
def convmixer_256_8_p1_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    """The paper's CIFAR-10 model (92.72% on colour EtC); ~8 images/s on 2 CPU cores: a GPU model."""
    return _convmixer(256, 8, 1, 9, **kwargs)


@register_model
def convmixer_256_8_p2_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    return _convmixer(256, 8, 2, 9, **kwargs)


@register_model
def convmixer_256_8_p4_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    """CPU-sized: ~234 images/s on 2 cores at 32x32 (3.6 min per CIFAR-10 epoch)."""
    return _convmixer(256, 8, 4, 9, **kwargs)


@register_model
def convmixer_384_8_p4_k9(pretrained: bool = False, **kwargs) -> ConvMixer:
    """The paper's Imagenette model (224x224)."""
    return _convmixer(384, 8, 4, 9, **kwargs)
