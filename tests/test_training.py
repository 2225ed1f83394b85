"""The plain training pieces (no Ray): augmentation, one epoch, evaluation, checkpoints."""
from pathlib import Path

import pytest
import torch

from mlcore import checkpoint as ckpt
from mlcore.augment import block_cutmix, mixup, partners, random_crop_flip
from mlcore.data import EncodedImages, outbox_refs
from mlcore.loop import evaluate, seen_and_unseen_accuracy, train_one_epoch
from orchestrator.config import TrainingConfig
from orchestrator.training import TrainJob, make_model
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.shards import Manifest
from protocol.task import Task

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample" / "test"
SECRET = b"CANARY-training-0123456789abcdef"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "outbox"
    encrypt_folder(SAMPLE, out, OwnerKey("k", SECRET), EncryptSettings(split="train", shard_images=100), progress=False)
    refs = outbox_refs(out, "owner")
    settings = TrainingConfig(model="convmixer_256_8_p4_k9", epochs=1, batch_size=32, strategy="shared-key",
                              mixup_alpha=0.2, cutmix_prob=0.5)
    return TrainJob("t", Task(tuple(Manifest.load(out).classes)), refs, refs, settings, str(out), "test")


def test_block_cutmix_moves_whole_blocks_only():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 64 * 64, dtype=torch.float).reshape(4, 1, 64, 64)  # every pixel unique
    targets = torch.eye(4)
    replaced_any = False
    for _ in range(20):
        out, mixed = block_cutmix(x, targets, 16, torch.randperm(4, generator=g), g)
        changed = (out != x).float().reshape(4, 4, 16, 4, 16).mean(dim=(2, 4))  # per image, per block
        assert set(changed.unique().tolist()) <= {0.0, 1.0}  # a block is replaced whole or not at all
        replaced_any |= bool(changed.any())
        assert torch.allclose(mixed.sum(1), torch.ones(4))
    assert replaced_any


def test_mixup_and_crop_keep_shapes_and_label_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    y = torch.eye(8)[:, :8]
    mixed, ty = mixup(x, y, 0.4, torch.randperm(8, generator=g), g)
    assert mixed.shape == x.shape and torch.allclose(ty.sum(1), torch.ones(8))
    cropped = random_crop_flip(x, 4, g)
    assert cropped.shape == x.shape and not torch.equal(cropped, x)


def test_mixing_partners_share_the_key():
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    for _ in range(10):
        perm = partners(groups, g)
        assert sorted(perm.tolist()) == list(range(10))  # a permutation
        assert torch.equal(groups[perm], groups)  # every partner has the same key


def test_one_epoch_learns_and_checkpoint_describes_itself_without_secrets(job, tmp_path):
    torch.manual_seed(0)
    model = make_model(job).to(memory_format=torch.channels_last)
    data = EncodedImages(list(job.train), job.groups)
    assert len(data) == 200 and data[0][0].shape == (3, 32, 32) and data[0][0].dtype == torch.uint8
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=3 * len(loader))
    losses = [train_one_epoch(model, loader, opt, sched, job.settings, job.task, torch.device("cpu"),
                                             torch.Generator())["train_loss"]
              for _ in range(3)]
    assert losses[-1] < losses[0]
    after = evaluate(model, data, job.groups, job.settings, torch.device("cpu"))
    assert set(after["per_group"]) == set(job.groups) and after["per_group"][job.groups[0]]["images"] == 200
    path = tmp_path / ckpt.CHECKPOINT_FILE
    torch.save(ckpt.payload(job.checkpoint_header(), model, opt, sched, 2, {"test_acc": after["test_acc"]}), path)
    payload = ckpt.load_checkpoint(path)
    assert payload["model"] == "convmixer_256_8_p4_k9" and payload["key_ids"] == job.groups
    assert ckpt.task_of(payload) == job.task and payload["run_name"] == "t" and payload["owners"] == ["owner"]
    assert "workers" not in payload["training"]  # the ML settings only
    restored = ckpt.model_from_checkpoint(payload)
    again = evaluate(restored, data, job.groups, job.settings, torch.device("cpu"))
    assert again["test_acc"] == pytest.approx(after["test_acc"])
    blob = path.read_bytes()
    assert SECRET not in blob and SECRET.hex().encode() not in blob


def test_per_epoch_test_accuracy_keeps_unseen_keys_apart():
    per_group = {"k1": {"acc": 0.6, "images": 100}, "k2": {"acc": 0.4, "images": 300}, "x": {"acc": 0.1, "images": 50}}
    out = seen_and_unseen_accuracy(per_group, ["k1", "k2"])
    assert out["test_acc"] == pytest.approx(0.45) and out["test_acc_unseen_keys"] == pytest.approx(0.1)
    assert "test_acc_unseen_keys" not in seen_and_unseen_accuracy(per_group, ["k1", "k2", "x"])
