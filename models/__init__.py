"""timm-based isotropic networks (ConvMixer, ViT) and key-aware variants: built with the training issue."""
