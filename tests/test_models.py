"""models/: registered variants and the block-grid checks made before anything trains."""
import pytest
import timm
import torch

from models import ModelConfigError, build_model, list_models, patch_size_of


@pytest.mark.parametrize("name, patch", [("convmixer_256_8_p1_k9", 1), ("convmixer_256_8_p4_k9", 4),
                                         ("convmixer_384_8_p4_k9", 4), ("vit_192_6_p4_32", 4), ("vit_192_6_p8_32", 8)])
def test_variants_are_registered_with_timm_and_spell_their_patch(name, patch):
    assert name in list_models() and name in timm.list_models()
    model = timm.create_model(name, num_classes=10)
    assert patch_size_of(model) == patch


def test_build_checks_patch_against_block_and_image():
    model = build_model("convmixer_256_8_p4_k9", 10, (32, 32), block_size=16)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    gray = build_model("convmixer_256_8_p4_k9", 10, (32, 96), in_chans=1, block_size=8)
    assert gray(torch.zeros(1, 1, 32, 96)).shape == (1, 10)
    with pytest.raises(ModelConfigError, match="must equal the EtC block size"):
        build_model("vit_192_6_p4_32", 10, (32, 32), block_size=16)
    with pytest.raises(ModelConfigError, match="does not divide the EtC block size 2"):
        build_model("convmixer_256_8_p4_k9", 10, (32, 32), block_size=2)
    with pytest.raises(ModelConfigError, match="does not divide the image size 30x30"):
        build_model("convmixer_256_8_p4_k9", 10, (30, 30))
    with pytest.raises(ModelConfigError, match="unknown model 'nope'"):
        build_model("nope", 10, (32, 32))
    with pytest.raises(ModelConfigError, match="does not exist"):
        build_model("vit_base_patch16_224", 10, (224, 224), block_size=16, pretrained_file="/nonexistent.safetensors")


def test_vit_b16_loads_pretrained_weights_from_a_local_file(tmp_path):
    """The real loading path, on a file written here (nothing is downloaded)."""
    source = timm.create_model("vit_base_patch16_224", num_classes=1000)
    path = tmp_path / "vit_b16.pth"
    torch.save(source.state_dict(), path)
    model = build_model("vit_base_patch16_224", 10, (224, 224), block_size=16, pretrained_file=path)
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert model.head.out_features == 10  # the head is re-initialised for the task's classes
