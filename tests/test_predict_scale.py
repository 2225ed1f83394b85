"""`owner-agent predict` for any number of files: folders searched recursively, batched within the
limits the prediction service states, one answer per image in order, results to CSV or JSON. Real
prediction service on 127.0.0.1, real CLI."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mlcore.checkpoint as ckpt
from mlcore.settings import TrainSettings
from models import build_network
from orchestrator import serve
from orchestrator.auth import token_sha256
from orchestrator.config import parse_config
from owners.cli import main as owner_agent
from owners.keys import OwnerKey, create_key, keyring_dir
from owners.predict import image_paths, request_batches
from protocol.task import Task

TASK = Task(("cat", "dog"), image_size=32, block_size=16, scheme="color")
KEY = OwnerKey("clinic", hashlib.sha256(b"predict at scale").digest())
TOKEN = "predict-scale-token-77"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    settings = TrainSettings(strategy="shared-key", model="convmixer_256_8_p4_k9")
    model = build_network(settings.model, 2, TASK.model_input, None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = folder / ckpt.CHECKPOINT_FILE
    torch.save(ckpt.payload(ckpt.header(TASK, settings, [KEY.key_id]), model, optimizer,
                            torch.optim.lr_scheduler.StepLR(optimizer, 1), 0, {}), path)
    cfg = parse_config({"name": "scale", "task": {"classes": list(TASK.classes)},
                        "ingest": {"store": str(folder), "insecure_loopback": True,
                                   "owners": [{"id": "clinic", "token_sha256": token_sha256(TOKEN)}]},
                        "serve": {"max_images_per_request": 64}})  # 500 images need 8 requests
    running = serve.start_serving(cfg, path, lambda owner: {KEY.key_id}, listen="127.0.0.1:0")
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """500 images in nested folders, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(500):
        path = root / f"ward-{i % 3}" / f"day-{i % 7}" / f"img-{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    (root / "ward-0" / "broken.jpg").write_bytes(b"not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / ".hidden" / "skip.png")
    return root


def run_cli(tmp_path, monkeypatch, service, *args) -> int | str:
    """The real CLI's exit status (or its SystemExit message)."""
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    if not (keyring_dir() / f"{KEY.name}.key").exists():
        create_key(KEY.name, KEY.secret)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    try:
        return owner_agent(["predict", "--key", KEY.name, "--server", f"127.0.0.1:{service.port}", "--token-file",
                            str(token), "--no-progress", "--accept-cloud-can-decrypt", *map(str, args)])
    except SystemExit as exc:
        return exc.code


def test_500_files_in_one_call_get_500_answers_in_order(tmp_path, monkeypatch, service, images, capsys):
    out = tmp_path / "results.csv"
    assert run_cli(tmp_path, monkeypatch, service, "--output", out, images) == 1  # one file was not an image
    rows = list(csv.DictReader(out.open()))
    answered = [r for r in rows if r["rank"] == "1"]
    assert len(answered) == 500
    assert [r["path"] for r in answered] == [str(p) for p in image_paths([images]) if p.name != "broken.jpg"]
    assert [r["path"] for r in rows if r["error"]] == [str(images / "ward-0" / "broken.jpg")]
    assert "predicted 500 image(s), 1 refused" in capsys.readouterr().err


def test_json_output_and_files_and_folders_mixed(tmp_path, monkeypatch, service, images):
    out = tmp_path / "results.json"
    one = images / "ward-1" / "day-1" / "img-001.png"
    assert run_cli(tmp_path, monkeypatch, service, "--output", out, "--top", 1, one, images / "ward-2") == 0
    results = json.loads(out.read_text())
    assert results[0]["path"] == str(one) and len(results) == 1 + len(image_paths([images / "ward-2"]))
    assert all(len(r["top"]) == 1 and r["top"][0][0] in TASK.classes for r in results)


def test_a_missing_file_is_one_refused_result_and_a_bad_output_name_is_refused_first(tmp_path, monkeypatch, service,
                                                                                capsys):
    assert run_cli(tmp_path, monkeypatch, service, tmp_path / "no-such-file.png") == 1
    out = capsys.readouterr().out
    assert "no-such-file.png\terror:" in out and "No such file" in out
    assert "csv or .json" in str(run_cli(tmp_path, monkeypatch, service, "--output", tmp_path / "r.txt", tmp_path))


def test_request_batches_respect_both_limits():
    sizes = [10, 10, 10, 50, 10, 100, 10]
    encoded = [b"x" * n for n in sizes]
    batches = request_batches(encoded, max_images=3, max_bytes=60)
    assert [b for s, e in batches for b in range(s, e)] == list(range(len(sizes)))  # every image once, in order
    for start, end in batches:
        assert end - start <= 3
        assert sum(sizes[start:end]) <= 60 or end - start == 1  # an oversized image goes alone
