"""Strategy per-image-keys: every image under its own fresh key, a model that needs none.

Through the product: a cluster.yaml with task.key_mode per-image, two owners uploading with
`owner-agent` over the real gRPC ingest (one of them naming a key, which is unused), `orchestrator
launch` training the invariant network on Ray and serving it, and a real prediction. Around it: the
network's logits are the same under any key, the per-image secrets never reach a file or a log, and
the key-ownership rule exempts the per-image key id, and only in a per-image run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcore.checkpoint import load_checkpoint
from mlcore.data import BadSamples, normalise, outbox_refs, read_shard
from models import build_model
from orchestrator.auth import token_sha256
from orchestrator.config import ConfigError, parse_config
from orchestrator.ingest import start_ingest
from owners.agent import run_agent
from owners.cipher import BlockCipher, CipherGeometry
from owners.cli import main as owner_agent
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.images import load_rgb
from owners.keys import SECRET_BYTES
from owners.predict import predict_images
from owners.upload import Connection, IngestClient, ServiceError, upload_outbox
from protocol.codec import decode
from protocol.net import free_port
from protocol.shards import sample_id
from protocol.task import PER_IMAGE_KEY_ID, Task
from tests.test_ingest import KEY_A
from tests.test_launch import CLASSES, SAMPLE, launch_in_background, owner_folders, wait_until

MODEL = "invariant_128_6_p2_k5_mean"  # the smallest of the family: the test checks behaviour, not accuracy
TOKENS = {"hospital-a": "per-image-token-a", "hospital-b": "per-image-token-b"}


def fresh_keys(images: np.ndarray, geometry: CipherGeometry) -> torch.Tensor:
    """``images`` each under its own random key, as the network's input (N, C, H, W) in [-1, 1]."""
    encrypted = np.stack([BlockCipher(os.urandom(SECRET_BYTES), geometry).encrypt(x[None])[0] for x in images])
    x = torch.from_numpy(encrypted)
    return normalise(x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("model, scheme, block", [(MODEL, "color", 16), (MODEL, "color", 8), (MODEL, "gray", 8),
                                                   ("invariant_256_8_p4_k3_attn2", "color", 16)])
def test_logits_are_the_same_under_any_key(model, scheme, block):
    geometry = CipherGeometry(32, 32, block, scheme)
    task = Task(tuple(CLASSES), 32, block, scheme, chroma="444")
    torch.manual_seed(0)
    net = build_model(model, len(CLASSES), task.model_input.shape, task.model_input.in_chans, block).eval()
    images = np.stack([load_rgb(p, 32)[0] for p in sorted((SAMPLE / "test" / "cat").iterdir())[:4]])
    with torch.no_grad():
        under_a, under_b = net(fresh_keys(images, geometry)), net(fresh_keys(images, geometry))
    torch.testing.assert_close(under_a, under_b, rtol=1e-5, atol=1e-5)
    # it does look at the image (untrained, so the differences are small, but far above the keys')
    assert (under_a[0] - under_a[1]).abs().max() > 10 * (under_a - under_b).abs().max()


def cluster(tmp_path: Path, key_mode: str = "per-image", **training) -> dict:
    return {"name": "per-image", "task": {"classes": CLASSES, "key_mode": key_mode},
            "ingest": {"store": str(tmp_path / "store"), "insecure_loopback": True,
                       "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in TOKENS.items()]},
            "training": {"strategy": "per-image-keys", "model": MODEL, **training}}


@pytest.mark.parametrize("key_mode, training, field", [
    ("owner", {}, "training.strategy"),  # per-image-keys on owners' keys
    ("per-image", {"strategy": "shared-key"}, "training.strategy"),  # per-image data, a keyed strategy
    ("per-image", {"model": "convmixer_256_8_p4_k9"}, "training.model"),  # a network that needs a key
])
def test_config_pairs_the_strategy_the_key_mode_and_an_invariant_model(tmp_path, key_mode, training, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        parse_config(cluster(tmp_path, key_mode, **training))


def test_per_image_secrets_reach_no_file_and_no_log(tmp_path, monkeypatch, capsys):
    """A canary in os.urandom: each image's secret is recognisable, and none of its encodings may show up
    in the outbox (shards, manifest, local report and index) or anything the command printed."""
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    drawn: list[bytes] = []
    real = os.urandom

    def canary(n: int) -> bytes:
        if n != SECRET_BYTES:  # someone else's randomness (temporary names, hashing seeds)
            return real(n)
        drawn.append(f"CANARY-{len(drawn):06d}-".encode().ljust(n, b"#"))
        return drawn[-1]

    monkeypatch.setattr(os, "urandom", canary)
    out = tmp_path / "outbox"
    assert owner_agent(["encrypt", "--per-image-keys", "--key", "unused", "--data", str(SAMPLE / "test"), "--out",
                        str(out), "--format", "png", "--no-progress"]) == 0
    monkeypatch.undo()
    logs = capsys.readouterr()
    assert "--key unused is unused" in logs.err
    assert not list(tmp_path.rglob("unused*"))  # the named key was not even created
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key_id"] == PER_IMAGE_KEY_ID and len(drawn) == manifest["count"] == 200  # one secret per image
    stored = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) + (logs.out + logs.err).encode()
    for secret in drawn[:3] + drawn[-3:]:
        for encoding in (secret, secret.hex().encode(), secret[:12]):
            assert encoding not in stored
    assert b"CANARY" not in stored
    # ... and those secrets, and no others, are what encrypted the images: one decrypts its image exactly
    geometry = CipherGeometry(32, 32, 16, "color")
    source = {row["id"]: row["file"] for row in map(json.loads, (out / "local" / "index.jsonl").open())}
    samples = list(read_shard(outbox_refs(out, "me")[0], Task(tuple(CLASSES), format="png"), BadSamples()))
    first = decode(samples[0][0])
    plain = load_rgb(SAMPLE / "test" / source[sample_id(samples[0][0])], 32)[0]
    matches = [s for s in drawn if np.array_equal(BlockCipher(s, geometry).decrypt(first[None])[0], plain)]
    assert len(matches) == 1


def upload_to(addr: str, owner: str, outbox: Path, new_key_domain: bool = False):
    client = IngestClient(Connection(addr, TOKENS[owner], retries=1), log=lambda m: None)
    try:
        return upload_outbox(outbox, client, new_key_domain)
    finally:
        client.close()


def test_the_per_image_key_id_is_nobodys_and_only_for_per_image_runs(tmp_path):
    task = Task(tuple(CLASSES), key_mode="per-image")
    per_image = {owner: tmp_path / f"per-image-{owner}" for owner in TOKENS}  # fresh keys: different bytes
    owner_key = tmp_path / "owner-key"
    for outbox in per_image.values():
        encrypt_folder(SAMPLE / "test", outbox, None, EncryptSettings(task=task, workers=1), progress=False)
    encrypt_folder(SAMPLE / "test", owner_key, KEY_A, EncryptSettings(task=Task(tuple(CLASSES)), workers=1),
                   progress=False)
    runs = {}
    for mode, strategy in (("per-image", "per-image-keys"), ("owner", "key-adapters")):
        doc = cluster(tmp_path / mode, mode, strategy=strategy, model=MODEL if mode == "per-image" else
                      "convmixer_256_8_p4_k9")
        runs[mode] = start_ingest(parse_config(doc), listen="127.0.0.1:0")
    try:
        addr = {mode: f"127.0.0.1:{service.port}" for mode, service in runs.items()}
        # per-image run: both owners upload under the sentinel; the first owner does not come to own it
        for owner in TOKENS:
            assert upload_to(addr["per-image"], owner, per_image[owner]).key_id == PER_IMAGE_KEY_ID
        with pytest.raises(ServiceError, match="FAILED_PRECONDITION: this run takes a fresh key per image"):
            upload_to(addr["per-image"], "hospital-a", owner_key, new_key_domain=True)  # past the domain check
        # owner-key run: the sentinel is nobody's key there, and no one may claim it
        with pytest.raises(ServiceError, match=f"FAILED_PRECONDITION: key id '{PER_IMAGE_KEY_ID}' is for data"):
            upload_to(addr["owner"], "hospital-a", per_image["hospital-a"])
        assert upload_to(addr["owner"], "hospital-a", owner_key).key_id == KEY_A.key_id
    finally:
        for service in runs.values():
            service.stop(0)


def test_launch_trains_and_serves_per_image_keys_from_two_owners(tmp_path, monkeypatch, capsys):
    serve_port, ingest_port = free_port(), free_port()
    doc = cluster(tmp_path, epochs=1, batch_size=32, start_when=list(TOKENS), wait_timeout_s=600)
    doc["ingest"]["listen"] = f"127.0.0.1:{ingest_port}"
    doc["serve"] = {"listen": f"127.0.0.1:{serve_port}"}
    cfg = parse_config(doc)
    with launch_in_background(cfg) as (messages, outcome):
        folders = owner_folders(tmp_path / "data", per_class=10)
        monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
        conn = {o: Connection(f"127.0.0.1:{ingest_port}", t) for o, t in TOKENS.items()}
        for owner, key in (("hospital-a", None), ("hospital-b", KEY_A)):  # b names a key: it is not used
            for split in ("train", "test"):
                summary = run_agent(key, folders[owner] / split, conn[owner], split, progress=False, plain_ok=False)
                assert summary["key_id"] == PER_IMAGE_KEY_ID and summary["outbox"].endswith(f"{split}-per-image")
        assert f"--key {KEY_A.name} is unused" in capsys.readouterr().err

        wait_until(lambda: any(m.startswith("prediction service on port") for m in messages) or "error" in outcome,
                   "training, evaluation and the prediction service")
        assert "error" not in outcome, outcome.get("error")
        report_path = Path(next(m.split(": ", 1)[1] for m in messages if m.startswith("report: ")))
        report = json.loads((report_path.parent / "report.json").read_text())
        assert {(r["owner"], r["key_id"], r["seen_in_training"]) for r in report["per_owner_key"]} == {
            ("hospital-a", PER_IMAGE_KEY_ID, True), ("hospital-b", PER_IMAGE_KEY_ID, True)}
        checkpoint = load_checkpoint(next(Path(tmp_path / "store").rglob("checkpoint.pt")))
        assert (checkpoint["strategy"], checkpoint["model"], checkpoint["key_ids"]) == (
            "per-image-keys", MODEL, [PER_IMAGE_KEY_ID])
        assert checkpoint["task"]["key_mode"] == "per-image"

        # each query image under its own fresh key; no key named, none needed, by either owner
        images = sorted((folders["hospital-a"] / "test").glob("*/*.jpg"))[:4]
        for owner in TOKENS:
            results = predict_images(None, images, Connection(f"127.0.0.1:{serve_port}", TOKENS[owner]),
                                     plain_ok=False, progress=False)
            assert [r.path for r in results] == [str(p) for p in images]
            assert all(r.error is None and r.top[0][0] in CLASSES for r in results)
