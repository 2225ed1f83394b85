"""The operator's dataset lifecycle through the real `orchestrator datasets` command on a real store:
list, quarantine and release (kept on disk, out of training and predictions), remove (catalog rows,
objects no other owner holds, partial uploads); and training takes only owners in cluster.yaml."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml

from orchestrator.auth import token_sha256
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.keypolicy import KeyPolicy
from orchestrator.launch import build_job
from orchestrator.store import SCHEMA, ShardStore
from protocol.shards import Manifest
from tests.test_bad_data import CLASSES, KEY, crafted_outbox, good_tar, plant

COMMON = good_tar(4)  # the same shard bytes in two owners' datasets: one object file


def write_config(tmp_path: Path, owners: list[str]) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "name": "lifecycle",
        "task": {"classes": list(CLASSES)},
        "ingest": {"listen": "127.0.0.1:50999", "store": "store", "insecure_loopback": True,
                   "owners": [{"id": o, "token_sha256": token_sha256(f"token-{o}")} for o in owners]},
        "training": {"strategy": "shared-key", "epochs": 1, "batch_size": 4},
    }))
    return path


@pytest.fixture
def store_setup(tmp_path):
    """alice: a train dataset of her own shard and one shared with bob, a test dataset, and a
    partial upload; bob: the shared shard and one of his own; an uncommitted dataset of bob's."""
    cfg_path = write_config(tmp_path, ["alice", "bob"])
    cfg = load_config(cfg_path)
    store = ShardStore(Path(cfg.ingest.store) / cfg.name, cfg.task, key_policy=KeyPolicy.from_config(cfg))
    alice_train = crafted_outbox(tmp_path / "alice-train", [(good_tar(3), 3), (COMMON, 4)])
    plant(store, "alice", alice_train)
    plant(store, "alice", crafted_outbox(tmp_path / "alice-test", [(good_tar(2), 2)], split="test"))
    plant(store, "bob", crafted_outbox(tmp_path / "bob-train", [(COMMON, 4), (good_tar(5), 5)]))
    store.open_dataset("bob", (crafted_outbox(tmp_path / "bob-open", [(good_tar(1), 1)], split="test")
                               / "manifest.json").read_bytes())
    partial = store.root / "incoming" / "alice" / f"{'ab' * 32}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half a shard")
    shas = {name: [s.sha256 for s in Manifest.load(tmp_path / name).shards] for name in ("alice-train", "bob-train")}
    store.close()
    return cfg_path, shas, partial


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["datasets", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def listed(capsys, cfg_path: Path) -> list[dict]:
    code, out, _ = run(capsys, str(cfg_path), "list")
    assert code == 0
    header, *rows = [line.split() for line in out.splitlines()]
    assert header == ["owner", "dataset", "id", "split", "key", "id", "images", "committed", "quarantined", "bytes"]
    return [dict(zip(("owner", "id", "split", "key_id", "images", "committed", "quarantined", "bytes"), r))
            for r in rows]


def test_list_shows_every_dataset_with_its_state(store_setup, capsys):
    cfg_path, _, _ = store_setup
    rows = listed(capsys, cfg_path)
    assert [(r["owner"], r["split"], r["images"], r["committed"], r["quarantined"]) for r in rows] == [
        ("alice", "train", "7", "yes", "no"), ("alice", "test", "2", "yes", "no"),
        ("bob", "train", "9", "yes", "no"), ("bob", "test", "1", "no", "no")]
    assert all(r["key_id"] == KEY.key_id and int(r["bytes"]) > 0 and len(r["id"]) == 64 for r in rows)


def test_quarantine_keeps_data_on_disk_out_of_training_and_predictions_until_released(store_setup, capsys):
    cfg_path, shas, _ = store_setup
    cfg = load_config(cfg_path)
    assert run(capsys, str(cfg_path), "quarantine", "alice")[0] == 0
    assert [r["quarantined"] for r in listed(capsys, cfg_path) if r["owner"] == "alice"] == ["yes", "yes"]
    store = ShardStore(Path(cfg.ingest.store) / cfg.name, cfg.task)
    try:
        assert {d["owner"] for d in store.committed_datasets()} == {"bob"}
        assert store.key_ids_of("alice") == set() and store.key_ids_of("bob") == {KEY.key_id}
        assert {r.owner for r in build_job(cfg, store, log=lambda m: None).train} == {"bob"}
        assert all(store.object_path(sha).is_file() for sha in shas["alice-train"])  # kept on disk
    finally:
        store.close()
    assert run(capsys, str(cfg_path), "release", "alice")[0] == 0
    assert [r["quarantined"] for r in listed(capsys, cfg_path)] == ["no"] * 4


def test_quarantine_one_dataset_by_its_id_prefix(store_setup, capsys):
    cfg_path, _, _ = store_setup
    alice_train = next(r["id"] for r in listed(capsys, cfg_path) if r["owner"] == "alice" and r["split"] == "train")
    code, _, err = run(capsys, str(cfg_path), "quarantine", "alice", "--dataset", alice_train[:12])
    assert code == 0 and alice_train in err
    assert [(r["split"], r["quarantined"]) for r in listed(capsys, cfg_path) if r["owner"] == "alice"] == [
        ("train", "yes"), ("test", "no")]
    cfg = load_config(cfg_path)
    store = ShardStore(Path(cfg.ingest.store) / cfg.name, cfg.task)
    try:
        assert store.key_ids_of("alice") == {KEY.key_id}  # its test dataset under that key is not held
    finally:
        store.close()


def test_unknown_owner_or_dataset_is_a_clear_error(store_setup, capsys):
    cfg_path, _, _ = store_setup
    code, _, err = run(capsys, str(cfg_path), "quarantine", "zed")
    assert code == 1 and "owner zed has no dataset" in err
    code, _, err = run(capsys, str(cfg_path), "remove", "alice", "--dataset", "not-hex", "--yes")
    assert code == 1 and "--dataset 'not-hex'" in err


def test_remove_needs_yes_then_deletes_the_owners_rows_objects_and_partial_uploads(store_setup, capsys):
    cfg_path, shas, partial = store_setup
    cfg = load_config(cfg_path)
    store_root = Path(cfg.ingest.store) / cfg.name
    code, out, err = run(capsys, str(cfg_path), "remove", "alice")
    assert code == 1 and "add --yes" in err and out.count("alice") == 2
    assert len(listed(capsys, cfg_path)) == 4  # nothing removed
    run(capsys, str(cfg_path), "quarantine", "alice")
    code, _, err = run(capsys, str(cfg_path), "remove", "alice", "--yes")
    assert code == 0 and "removed 2 dataset(s), 2 object file(s)" in err and "1 partial upload(s)" in err
    assert {r["owner"] for r in listed(capsys, cfg_path)} == {"bob"}
    own, common = shas["alice-train"]
    store = ShardStore(store_root, cfg.task)
    try:
        assert not store.object_path(own).exists() and store.object_path(common).is_file()  # bob holds common
        assert not partial.exists()
        assert store.key_ids_of("alice") == set()
        assert store._query("SELECT owner FROM owner_objects WHERE sha256 = ?", (common,)) == [("bob",)]
        assert not store._query("SELECT 1 FROM quarantine WHERE owner = 'alice'")
        assert {r.owner for r in build_job(cfg, store, log=lambda m: None).train} == {"bob"}
    finally:
        store.close()


def test_an_owner_no_longer_in_the_cluster_config_is_not_trained_on(store_setup, capsys):
    cfg_path, _, _ = store_setup
    cfg = load_config(write_config(cfg_path.parent, ["bob"]))  # alice dropped from ingest.owners
    store = ShardStore(Path(cfg.ingest.store) / cfg.name, cfg.task)
    messages: list[str] = []
    try:
        job = build_job(cfg, store, log=messages.append)
    finally:
        store.close()
    assert {r.owner for r in job.train} == {"bob"} and not job.test
    assert [(e["owner"], e["images"]) for e in job.exclusions] == [("alice", 9)]
    assert "not in ingest.owners" in job.exclusions[0]["reason"]
    assert any("owner alice" in m and "not in ingest.owners" in m for m in messages)


def test_a_catalog_from_before_quarantine_is_migrated_in_place(tmp_path):
    cfg = load_config(write_config(tmp_path, ["alice"]))
    root = Path(cfg.ingest.store) / cfg.name
    root.mkdir(parents=True)
    old_schema = SCHEMA[:SCHEMA.index("CREATE TABLE IF NOT EXISTS quarantine")]
    with sqlite3.connect(root / "catalog.sqlite") as db:
        db.executescript(old_schema)
    store = ShardStore(root, cfg.task)
    try:
        plant(store, "alice", crafted_outbox(tmp_path / "a", [(good_tar(2), 2)]))
        assert store.quarantine("alice") and store.committed_datasets() == []
        assert store.release("alice") and len(store.committed_datasets()) == 1
    finally:
        store.close()
