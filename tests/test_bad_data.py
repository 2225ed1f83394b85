"""Training survives bad data. Shards in the store may predate the store's inspection or be damaged
on disk: every kind of bad sample or shard is skipped and counted against its owner, an owner over
``training.max_bad_fraction`` is left out entirely, and a real launch with a hostile owner trains to
the end on the honest owner's data and names the exclusion in its report."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlcore.data import BadSamples, EncodedImages, ShardRef, check_shards, read_shard
from orchestrator.auth import token_sha256
from orchestrator.config import parse_config
from orchestrator.errors import RunFailed
from orchestrator.keypolicy import KeyPolicy
from orchestrator.launch import build_job, step
from orchestrator.store import ShardStore
from orchestrator.training import worker_error
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.codec import Codec
from protocol.net import free_port
from protocol.shards import Manifest, ShardInfo, file_sha256, sample_id
from protocol.task import Task
from tests.badfiles import bomb_png

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TASK = Task(CLASSES)
KEY = OwnerKey("honest", bytes(range(32)))
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- crafting shards


def jpeg(size: int = 32, mode: str = "RGB") -> bytes:
    pixels = RNG.integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
    return Codec().encode(pixels)


def other_format(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, name)
    return buffer.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 32x32 JPEG whose frame header claims another size (a JPEG decompression bomb)."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def sample(data: bytes, label: bytes | int = 0, ext: str = "jpg") -> list[tuple[str, bytes]]:
    sid = sample_id(data)
    return [(f"{sid}.{ext}", data), (f"{sid}.cls", str(label).encode() if isinstance(label, int) else label)]


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def good_tar(n: int) -> bytes:
    return tar_of([m for _ in range(n) for m in sample(jpeg(), int(RNG.integers(0, 10)))])


# kind -> (shard bytes, declared images, usable samples, a word of the reason). Every shard but the
# unreadable ones holds one good sample next to the bad thing: the good one must still train.
BAD_SHARDS = {
    "label out of range": (lambda: tar_of(sample(jpeg()) + sample(jpeg(), 99)), 2, 1, "outside the task"),
    "label not a number": (lambda: tar_of(sample(jpeg()) + sample(jpeg(), b"-1")), 2, 1, "not a number"),
    "image of the wrong size": (lambda: tar_of(sample(jpeg()) + sample(jpeg(64))), 2, 1, "64x64"),
    "grey image in a colour task": (lambda: tar_of(sample(jpeg()) + sample(jpeg(mode="L"))), 2, 1, "32x32 L"),
    "a PNG in a JPEG task": (lambda: tar_of(sample(jpeg()) + sample(other_format("PNG"), ext="png")), 2, 1,
                             "not a decodable jpeg"),
    "a TIFF": (lambda: tar_of(sample(jpeg()) + sample(other_format("TIFF"))), 2, 1, "not a decodable jpeg"),
    "a PNG decompression bomb": (lambda: tar_of(sample(jpeg()) + sample(bomb_png(40000, 40000))), 2, 1, "jpeg"),
    "a JPEG decompression bomb": (lambda: tar_of(sample(jpeg()) + sample(jpeg_claiming(40000, 40000))), 2, 1,
                                  "decompression bomb"),
    "garbage bytes": (lambda: tar_of(sample(jpeg()) + sample(os.urandom(500))), 2, 1, "not a decodable jpeg"),
    "a truncated JPEG": (lambda: tar_of(sample(jpeg()) + sample(jpeg()[:300])), 2, 1, "not a decodable jpeg"),
    "an image without a label": (lambda: tar_of(sample(jpeg()) + sample(jpeg())[:1]), 2, 1, "without a label"),
    "a member that is no sample": (lambda: tar_of(sample(jpeg()) + [("../../evil.sh", b"rm -rf /")]), 2, 1,
                                   "not a sample"),
    "an oversized member": (lambda: tar_of(sample(jpeg()) + sample(bytes(8 << 20))), 2, 1, "too large"),
    "fewer samples than declared": (lambda: good_tar(1), 1000, 1, "fewer samples than the manifest declares"),
    "more samples than declared": (lambda: good_tar(3), 1, 1, "more samples than the manifest declares"),
    "not a tar": (lambda: os.urandom(4096), 2, 0, "shard unreadable"),
    "a truncated tar": (lambda: good_tar(2)[:1200], 2, 0, "shard unreadable"),
    "a compressed tar (a possible bomb)": (lambda: gzip.compress(good_tar(2)), 2, 0, "shard unreadable"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SHARDS))
def test_each_kind_of_bad_shard_is_skipped_and_counted_against_its_owner(tmp_path, kind):
    make, declared, usable, words = BAD_SHARDS[kind]
    path = tmp_path / "shard-00000.tar"
    path.write_bytes(make())
    ref = ShardRef(str(path), "mallory", KEY.key_id, "train", declared)
    data = EncodedImages([ref], [KEY.key_id], TASK)  # never raises for what the file holds
    assert len(data) == usable
    expected_bad = declared - usable if kind != "more samples than declared" else 1
    assert data.bad.count("mallory") >= max(1, expected_bad)
    assert any(words in reason for reason in data.bad.reasons("mallory")), data.bad.reasons("mallory")
    for i in range(len(data)):  # what is left decodes to the task's shape
        image, label, group = data[i]
        assert tuple(image.shape) == (3, 32, 32) and 0 <= int(label) < len(CLASSES) and int(group) == 0


def test_a_missing_object_file_counts_every_declared_image(tmp_path):
    bad = BadSamples()
    assert list(read_shard(ShardRef(str(tmp_path / "gone"), "mallory", None, "train", 7), TASK, bad)) == []
    assert bad.count("mallory") == 7 and "FileNotFoundError" in next(iter(bad.reasons("mallory")))


def test_a_sample_that_fails_to_decode_in_training_is_replaced_and_counted(tmp_path):
    path = tmp_path / "shard-00000.tar"
    path.write_bytes(good_tar(3))
    data = EncodedImages([ShardRef(str(path), "owner", None, "train", 3)], ["owner"], TASK)
    data.encoded[1] = b"damaged in memory after the load-time check"
    labels = [int(data[i][1]) for i in range(3)]
    assert labels[1] == labels[2]  # sample 1 answered by the next sound one
    assert data.decode_failures.count("owner") == 1


# --------------------------------------------------------------------------- a store with planted data


def plant(store: ShardStore, owner: str, outbox: Path) -> None:
    """Put an outbox into the store as code from before the inspection did: objects stored unread."""
    state = store.open_dataset(owner, (outbox / "manifest.json").read_bytes())
    for shard in Manifest.load(outbox).shards:
        partial = store.root / "incoming" / f"{owner}-{shard.sha256}.part"
        shutil.copyfile(outbox / shard.name, partial)
        store._store_object(owner, partial, shard.sha256, shard.bytes)
    store.commit_dataset(owner, state.dataset_id)


def crafted_outbox(folder: Path, shards: list[tuple[bytes, int]], split: str = "train") -> Path:
    """An outbox whose manifest is consistent with itself whatever its shards hold."""
    folder.mkdir(parents=True)
    infos = []
    for i, (data, declared) in enumerate(shards):
        path = folder / f"shard-{i:05d}.tar"
        path.write_bytes(data)
        digest, size = file_sha256(path)
        infos.append(ShardInfo(path.name, digest, size, declared))
    count = sum(i.count for i in infos)
    Manifest(key_id=KEY.key_id, scheme="color", image_size=32, block_size=16, codec=Codec().__dict__,
             classes=list(CLASSES), split=split, count=count, class_counts=[count] + [0] * (len(CLASSES) - 1),
             shards=infos).write(folder)
    return folder


def honest_outbox(folder: Path, split: str, per_class: int) -> Path:
    images = folder.parent / f"{folder.name}-images"
    for cls in CLASSES:
        (images / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / split / cls).iterdir())[:per_class]:
            (images / cls / f.name).symlink_to(f)
    encrypt_folder(images, folder, KEY, EncryptSettings(task=TASK, split=split, shard_images=50, workers=1),
                   progress=False)
    return folder


def config(tmp_path: Path, owners: list[str], **training) -> object:
    return parse_config({
        "name": "bad-data",
        "ray": {"address": None, "dashboard_port": free_port()},
        "task": {"classes": list(CLASSES)},
        "ingest": {"listen": f"127.0.0.1:{free_port()}", "store": str(tmp_path / "store"), "insecure_loopback": True,
                   "owners": [{"id": o, "token_sha256": token_sha256(f"token-{o}")} for o in owners]},
        "training": {"strategy": "shared-key", "epochs": 1, "batch_size": 32, "wait_timeout_s": 60, **training},
        "serve": {"listen": f"127.0.0.1:{free_port()}"},
    })


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("honest")
    return {"train": honest_outbox(root / "train", "train", 20), "test": honest_outbox(root / "test", "test", 10)}


def every_bad_shard() -> list[tuple[bytes, int]]:
    return [(make(), declared) for make, declared, _, _ in BAD_SHARDS.values()]


def planted_store(tmp_path: Path, honest: dict[str, Path], cfg) -> ShardStore:
    """honest: its train and test splits; mallory: a shard of every bad kind; careless: the honest
    test images plus one shard with one label out of range (under the bad fraction). All under one
    key, which shared-key lets every listed owner use."""
    store = ShardStore(Path(cfg.ingest.store) / cfg.name, cfg.task, key_policy=KeyPolicy.from_config(cfg))
    plant(store, "honest", honest["train"])
    plant(store, "honest", honest["test"])
    plant(store, "mallory", crafted_outbox(tmp_path / "mallory", every_bad_shard()))
    careless = tmp_path / "careless"
    shutil.copytree(honest["test"], careless)
    manifest = Manifest.load(careless)
    extra = careless / f"shard-{len(manifest.shards):05d}.tar"
    extra.write_bytes(tar_of(sample(jpeg(), 99)))
    digest, size = file_sha256(extra)
    manifest.shards.append(ShardInfo(extra.name, digest, size, 1))
    manifest.count += 1
    manifest.class_counts[0] += 1
    manifest.split = "train"
    manifest.write(careless)
    plant(store, "careless", careless)
    return store


def test_an_owner_over_the_bad_fraction_is_left_out_and_the_others_bad_samples_skipped(tmp_path, honest):
    cfg = config(tmp_path, ["honest", "mallory", "careless"], max_bad_fraction=0.05)
    store = planted_store(tmp_path, honest, cfg)
    messages: list[str] = []
    try:
        job = build_job(cfg, store, log=messages.append)
    finally:
        store.close()
    assert {r.owner for r in job.train} == {"honest", "careless"} and {r.owner for r in job.test} == {"honest"}
    (excluded,) = job.exclusions
    assert excluded["owner"] == "mallory" and "over training.max_bad_fraction 0.05" in excluded["reason"]
    assert excluded["images"] == sum(declared for _, declared in every_bad_shard())
    assert any("mallory" in m and "excluded" in m for m in messages)
    assert job.skipped == {"careless": {"images": 101, "bad": 1,
                                        "reasons": {"label outside the task's 10 classes": 1}}}
    # the honest owner's samples are all there
    honest_train = EncodedImages([r for r in job.train if r.owner == "honest"], job.groups, job.task)
    assert len(honest_train) == 200 and not honest_train.bad.by_owner
    assert check_shards(job.test, job.task).by_owner == {}


def test_a_higher_bad_fraction_keeps_the_owner_but_skips_its_bad_samples(tmp_path, honest):
    cfg = config(tmp_path, ["honest", "mallory", "careless"], max_bad_fraction=1.0)
    store = planted_store(tmp_path, honest, cfg)
    try:
        job = build_job(cfg, store, log=lambda m: None)
    finally:
        store.close()
    assert {r.owner for r in job.train} == {"honest", "mallory", "careless"} and not job.exclusions
    assert job.skipped["mallory"]["bad"] >= 1000


def test_shared_key_leaves_out_train_data_under_another_key_naming_its_owner(tmp_path, honest):
    cfg = config(tmp_path, ["honest", "squatter"])
    store = planted_store_two_keys(tmp_path, honest, cfg)
    messages: list[str] = []
    try:
        job = build_job(cfg, store, log=messages.append)
    finally:
        store.close()
    assert {r.owner for r in job.train} == {"honest"}
    (excluded,) = job.exclusions
    assert excluded["owner"] == "squatter" and f"this run's is {KEY.key_id}" in excluded["reason"]
    assert any("squatter" in m for m in messages)


def planted_store_two_keys(tmp_path: Path, honest: dict[str, Path], cfg) -> ShardStore:
    """The honest owner's train data first, then another owner's under a second key id (planted: the
    ingest service of this code refuses a second train key id under shared-key)."""
    store = ShardStore(Path(cfg.ingest.store) / cfg.name, cfg.task)
    plant(store, "honest", honest["train"])
    other = tmp_path / "other-key"
    shutil.copytree(honest["train"], other)
    manifest = Manifest.load(other)
    manifest.key_id = OwnerKey("other", bytes(range(1, 33))).key_id
    manifest.write(other)
    plant(store, "squatter", other)
    return store


# --------------------------------------------------------------------------- failures say where


def test_a_failed_step_names_itself_and_its_log():
    with pytest.raises(RunFailed, match=r"step 'select data' failed: KeyError: .*; see /some/log"), \
            step("select data", "/some/log"):
        raise KeyError("boom")


def test_the_workers_error_is_taken_out_of_rays_wrapper():
    wrapped = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent "
                           "call last):\n  File \"x.py\", line 1\nmlcore.data.UnusableData: 16 samples in a row "
                           "failed to decode (owners: mallory)\n")
    assert worker_error(wrapped) == "mlcore.data.UnusableData: 16 samples in a row failed to decode (owners: mallory)"


# --------------------------------------------------------------------------- a real launch


@pytest.mark.slow
def test_launch_with_a_hostile_owner_trains_on_the_honest_owner_and_reports_the_exclusion(tmp_path, honest):
    from orchestrator.launch import launch

    cfg = config(tmp_path, ["honest", "mallory", "careless"], max_bad_fraction=0.05, start_when=["honest"])
    planted_store(tmp_path, honest, cfg).close()
    messages: list[str] = []
    report = launch(cfg, once=True, stop=threading.Event(), log=messages.append)
    doc = json.loads((report.parent / "report.json").read_text())
    assert [e["owner"] for e in doc["excluded"]] == ["mallory"]
    assert "unusable" in doc["excluded"][0]["reason"]
    assert doc["skipped_samples"]["careless"]["bad"] == 1 and "honest" not in doc["skipped_samples"]
    assert doc["epochs"][-1]["train_samples"] == 200 + 100  # every honest sample, careless' good ones
    rows = {r["owner"]: r for r in doc["per_owner_key"]}
    assert set(rows) == {"honest"} and rows["honest"]["images"] == 100 and rows["honest"]["seen_in_training"]
    text = report.read_text()
    assert "## Data left out" in text and "| mallory | all data (train) |" in text
    assert any(m.startswith("excluded from this run: all data (train) of owner mallory") for m in messages)
