"""Key adapters: they can undo a key exactly, route by key id, refuse unknown keys, train, and
their weights reveal the owners' relative schedules (what the leakage measurement reports)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.leakage import relative_recovery
from mlcore import checkpoint as ckpt
from mlcore.data import EncodedImages, outbox_refs
from mlcore.loop import evaluate, make_optimizer, train_one_epoch
from models import UnknownKeyError, build_network
from models.keyed import BlockAdapter, KeyedModel, TokenAdapter, decode_adapter
from orchestrator.config import TrainingConfig
from orchestrator.errors import ModelNotTrainedForKey
from orchestrator.serve import Predictor
from orchestrator.training import TrainJob, make_model
from owners.adapters import inverse_setting
from owners.cipher import CipherGeometry, derive_schedule, encrypt_reference
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.shards import Manifest
from protocol.task import Task

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample" / "test"
SECRETS = [b"CANARY-keyed-A-0123456789abcdef!", b"CANARY-keyed-B-0123456789abcdef!"]


def normalised(plane: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(plane.transpose(2, 0, 1).astype(np.float32))[None] / 127.5 - 1


@pytest.mark.parametrize("rows, cols, channels, block, scheme", [(32, 32, 3, 16, "color"), (64, 48, 3, 16, "color"),
                                                                 (32, 96, 1, 8, "gray")])
def test_adapter_can_be_the_exact_inverse_of_a_key(rows, cols, channels, block, scheme):
    plane = np.random.default_rng(1).integers(0, 256, (rows, cols, channels), dtype=np.uint8)
    geometry = CipherGeometry(rows, cols if scheme == "color" else cols // 3, block, scheme)
    schedule = derive_schedule(SECRETS[0], geometry)
    encrypted = encrypt_reference(plane, schedule, block)
    adapter = BlockAdapter(channels, (rows, cols), block)
    assert not torch.allclose(adapter(normalised(encrypted)), normalised(plane), atol=1e-3)
    adapter.set_exact(*inverse_setting(schedule, channels))
    assert torch.allclose(adapter(normalised(encrypted)), normalised(plane), atol=1e-5)


def test_keyed_model_routes_each_image_through_its_keys_adapter_and_refuses_others():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    model = KeyedModel(trunk, ["ka", "kb"], lambda: BlockAdapter(3, (32, 32), 16))
    with torch.no_grad():
        model.adapters[1].colour.mul_(-1)  # make the two adapters differ
    x = torch.randn(6, 3, 32, 32)
    keys = torch.tensor([0, 1, 1, 0, 1, 0])
    out = model(x, keys)
    for i, k in enumerate(keys.tolist()):
        assert torch.allclose(out[i], trunk(model.adapters[k](x[i:i + 1]))[0], atol=1e-5)
    assert not torch.allclose(out[0], model(x[:1], torch.tensor([1]))[0])
    with pytest.raises(UnknownKeyError, match="no adapter"):
        model(x, torch.tensor([0, 1, 2, 0, 1, 0]))
    with pytest.raises(UnknownKeyError, match="kc"):
        model.key_index("kc")
    counts = model.parameter_counts()
    assert counts["per_key"] == 4 * 4 + 4 * 8 + 4 * (9 + 3)
    assert counts["total"] == counts["shared"] + 2 * counts["per_key"]


def test_leakage_measure_sees_exact_adapters_and_not_fresh_ones():
    geometry = CipherGeometry(64, 64, 16, "color")
    schedules = [derive_schedule(bytes([i]) * 32, geometry) for i in range(3)]
    exact = []
    for s in schedules:
        adapter = BlockAdapter(3, (64, 64), 16)
        adapter.set_exact(*inverse_setting(s, 3))
        assert sorted(decode_adapter(adapter)["place"].tolist()) == list(range(16))
        exact.append(adapter)
    assert relative_recovery(exact, schedules) == {"blocks": 16, "chance_order": 1 / 16, "relative_order": 1.0,
                                                   "relative_full": 1.0, "absolute_full": 1.0}
    fresh = relative_recovery([BlockAdapter(3, (64, 64), 16) for _ in schedules], schedules)
    assert fresh["relative_order"] < 0.5 and fresh["relative_full"] < 0.5 and fresh["absolute_full"] < 0.5


@pytest.fixture(scope="module")
def keyed_job(tmp_path_factory):
    refs = ()
    for i, secret in enumerate(SECRETS):  # two owners, one key each, the same images
        out = tmp_path_factory.mktemp(f"owner{i}") / "outbox"
        encrypt_folder(SAMPLE, out, OwnerKey(f"k{i}", secret), EncryptSettings(split="train", shard_images=100),
                       progress=False)
        refs += outbox_refs(out, f"owner{i}")
    settings = TrainingConfig(model="convmixer_256_8_p4_k9", epochs=2, batch_size=32, strategy="key-adapters",
                              lr=3e-3, mixup_alpha=0.2, cutmix_prob=0.5)
    return TrainJob("keyed", Task(tuple(Manifest.load(out).classes)), refs, refs, settings,
                    str(tmp_path_factory.mktemp("logs")), "test")


def test_key_adapters_train_checkpoint_and_serve_only_known_keys(keyed_job, tmp_path):
    torch.manual_seed(0)
    job = keyed_job
    model = make_model(job)
    assert isinstance(model, KeyedModel) and model.key_ids == job.groups and len(job.groups) == 2
    data = EncodedImages(list(job.train), job.groups)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    optimizer, scheduler = make_optimizer(model, job.settings, 2 * len(loader))
    assert optimizer.param_groups[1]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"] * 10)
    before = [a.placement.detach().clone() for a in model.adapters]
    losses = [train_one_epoch(model, loader, optimizer, scheduler, job.settings, job.task, torch.device("cpu"),
                              torch.Generator().manual_seed(0))["train_loss"] for _ in range(2)]
    assert losses[1] < losses[0]
    assert all(not torch.equal(b, a.placement) for b, a in zip(before, model.adapters))  # adapters learn
    # an unknown key's test images are refused, not answered with noise
    other = tmp_path / "other"
    encrypt_folder(SAMPLE, other, OwnerKey("x", b"another key, never trained on..."),
                   EncryptSettings(split="test", shard_images=100), progress=False)
    m = Manifest.load(other)
    unknown = list(outbox_refs(other, "stranger"))
    groups = [*job.groups, m.key_id]
    result = evaluate(model, EncodedImages(list(job.train) + unknown, groups), groups, job.settings,
                      torch.device("cpu"))
    assert result["per_group"][m.key_id] == {"acc": None, "images": 200, "refused": True}
    assert all(result["per_group"][g]["acc"] is not None for g in job.groups)
    stolen = evaluate(model, EncodedImages(unknown, [m.key_id]), [m.key_id], job.settings, torch.device("cpu"),
                      route={m.key_id: job.groups[0]})
    assert stolen["per_group"][m.key_id]["acc"] is not None
    # the checkpoint rebuilds the keyed model, holds no secret, and the predictor routes by key id
    path = tmp_path / ckpt.CHECKPOINT_FILE
    torch.save(ckpt.payload(job.checkpoint_header(), model, optimizer, scheduler, 1, {}), path)
    blob = path.read_bytes()
    assert not any(s in blob or s.hex().encode() in blob for s in SECRETS)
    restored = ckpt.model_from_checkpoint(ckpt.load_checkpoint(path))
    assert isinstance(restored, KeyedModel) and restored.key_ids == job.groups
    trained = evaluate(model, data, job.groups, job.settings, torch.device("cpu"))["test_acc"]
    assert evaluate(restored, data, job.groups, job.settings, torch.device("cpu"))["test_acc"] == pytest.approx(trained)
    predictor = Predictor(path)
    encoded = data.encoded[:4]
    probs = {k: predictor.predict(encoded, k) for k in job.groups}
    assert all(p.shape == (4, len(job.task.classes)) for p in probs.values())
    assert not np.allclose(probs[job.groups[0]], probs[job.groups[1]])  # different adapters answer
    with pytest.raises(ModelNotTrainedForKey, match="not trained on key id"):
        predictor.predict(encoded, m.key_id)
    with pytest.raises(ModelNotTrainedForKey, match="not trained on key id"):
        predictor.predict(encoded, None)


def test_keyed_vit_has_per_key_patch_and_position_embeddings_and_they_can_undo_a_scramble():
    torch.manual_seed(0)
    model = build_network("vit_192_6_p16_32", 10, Task(tuple("abcdefghij")).model_input, ["ka", "kb"]).eval()
    assert isinstance(model.adapters[0], TokenAdapter) and model.adapters[0].position.shape == (1, 4, 192)
    x = torch.randn(3, 3, 32, 32)
    # key b = key a with its blocks scrambled: b's adapter copies a's with the position table permuted
    perm = [2, 0, 3, 1]  # encrypted block i of b holds block perm[i] of a
    scrambled = x.clone()
    for i, src in enumerate(perm):
        r, c = divmod(i, 2)
        sr, sc = divmod(src, 2)
        target, source = (slice(r * 16, (r + 1) * 16), slice(c * 16, (c + 1) * 16)), \
            (slice(sr * 16, (sr + 1) * 16), slice(sc * 16, (sc + 1) * 16))
        scrambled[:, :, target[0], target[1]] = x[:, :, source[0], source[1]]
    with torch.no_grad():
        model.adapters[1].proj.load_state_dict(model.adapters[0].proj.state_dict())
        model.adapters[1].position.copy_(model.adapters[0].position[:, perm])
    a = model(x, torch.zeros(3, dtype=torch.long))
    b = model(scrambled, torch.ones(3, dtype=torch.long))
    assert torch.allclose(a, b, atol=1e-4)  # the ViT trunk is blind to token order apart from positions
    assert not torch.allclose(a, model(scrambled, torch.zeros(3, dtype=torch.long)), atol=1e-3)
