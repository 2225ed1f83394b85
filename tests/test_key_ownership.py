"""Key ids belong to owners (an attacker's tests): a hostile owner cannot upload under another owner's
key id and so train the victim's adapter, unless the operator declared the key shared between them;
under shared-key a second train key id is refused at ingest, not found at training time. Real ingest
server on 127.0.0.1, real encrypted uploads."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from orchestrator.auth import token_sha256
from orchestrator.config import ConfigError, parse_config
from orchestrator.ingest import start_ingest
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from owners.upload import Connection, IngestClient, ServiceError, upload_outbox
from protocol.task import Task
from tests.test_ingest import CLASSES, KEY_A, KEY_B, SAMPLE, catalog, stored_objects

TOKENS = {"hospital-a": "token-a-7f3e9d1c", "hospital-b": "token-b-2a6c8e0f", "mallory": "token-m-0c1d2e3f"}
KEY_M = OwnerKey("m", hashlib.sha256(b"key m").digest())


def start(tmp_path, strategy: str, shared_keys=()) -> SimpleNamespace:
    cfg = parse_config({
        "name": "keys",
        "task": {"classes": CLASSES, "image_size": 32, "block_size": 16, "scheme": "color"},
        "ingest": {"store": str(tmp_path / "store"), "insecure_loopback": True,
                   "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in TOKENS.items()],
                   "shared_keys": [{"key_id": k, "owners": list(o)} for k, o in shared_keys]},
        "training": {"strategy": strategy},
    })
    service = start_ingest(cfg, listen="127.0.0.1:0")
    return SimpleNamespace(addr=f"127.0.0.1:{service.port}", root=service.store.root, service=service)


@pytest.fixture(scope="module")
def outboxes(tmp_path_factory):
    """Train and test splits under three keys (the sample folder, 200 images, two shards each)."""
    root = tmp_path_factory.mktemp("key-outboxes")
    boxes = {}
    for name, key in (("a", KEY_A), ("b", KEY_B), ("m", KEY_M)):
        for split in ("train", "test"):
            settings = EncryptSettings(task=Task(tuple(CLASSES)), split=split, shard_images=100)
            encrypt_folder(SAMPLE, root / f"{name}-{split}", key, settings, progress=False)
            boxes[f"{name}-{split}"] = root / f"{name}-{split}"
    return boxes


def upload(server, owner: str, outbox, new_key_domain: bool = False):
    client = IngestClient(Connection(server.addr, TOKENS[owner], retries=1), log=lambda m: None)
    try:
        return upload_outbox(outbox, client, new_key_domain)
    finally:
        client.close()


@pytest.fixture
def adapters(tmp_path):
    server = start(tmp_path, "key-adapters")
    yield server
    server.service.stop(0)


def test_another_owners_key_id_is_refused_and_nothing_is_stored(adapters, outboxes):
    upload(adapters, "hospital-a", outboxes["a-train"])
    before = stored_objects(adapters)
    # mallory somehow learnt hospital-a's key id (not its key) and uploads its own images under it
    with pytest.raises(ServiceError) as err:
        upload(adapters, "mallory", outboxes["a-test"])
    assert "PERMISSION_DENIED" in str(err.value)
    assert "registered to another owner" in str(err.value) and "hospital-a" not in str(err.value)
    assert stored_objects(adapters) == before
    assert catalog(adapters, "SELECT owner FROM datasets") == [("hospital-a",)]
    assert catalog(adapters, f"SELECT owner FROM key_domains WHERE key_id = '{KEY_A.key_id}'") == [("hospital-a",)]
    # its own key is fine, and the rightful owner keeps uploading under its key
    assert upload(adapters, "mallory", outboxes["m-train"]).committed
    assert upload(adapters, "hospital-a", outboxes["a-test"]).committed


def test_new_key_domain_does_not_let_an_owner_take_another_owners_key(adapters, outboxes):
    upload(adapters, "hospital-b", outboxes["b-train"])
    upload(adapters, "mallory", outboxes["m-train"])
    with pytest.raises(ServiceError) as err:
        upload(adapters, "mallory", outboxes["b-test"], new_key_domain=True)
    assert "PERMISSION_DENIED" in str(err.value)


def test_a_declared_shared_key_admits_exactly_the_named_owners(tmp_path, outboxes):
    server = start(tmp_path, "key-adapters", shared_keys=[(KEY_A.key_id, ("hospital-a", "hospital-b"))])
    try:
        assert upload(server, "hospital-a", outboxes["a-train"]).committed
        assert upload(server, "hospital-b", outboxes["a-test"]).committed  # the second site of one organisation
        with pytest.raises(ServiceError) as err:
            upload(server, "mallory", outboxes["a-test"], new_key_domain=True)
        assert "PERMISSION_DENIED" in str(err.value) and "shared_keys" in str(err.value)
    finally:
        server.service.stop(0)


def test_shared_key_refuses_a_second_train_key_at_ingest(tmp_path, outboxes):
    server = start(tmp_path, "shared-key")
    try:
        assert upload(server, "hospital-a", outboxes["a-train"]).committed
        assert upload(server, "hospital-b", outboxes["a-train"]).committed  # everyone holds the run's key
        with pytest.raises(ServiceError) as err:
            upload(server, "mallory", outboxes["m-train"])
        assert "FAILED_PRECONDITION" in str(err.value)
        assert KEY_A.key_id in str(err.value) and "shared-key" in str(err.value)
        assert {r[0] for r in catalog(server, "SELECT owner FROM datasets")} == {"hospital-a", "hospital-b"}
        # a test split under another key measures the model on a key it never saw: allowed
        assert upload(server, "mallory", outboxes["m-test"]).committed
    finally:
        server.service.stop(0)


def test_a_declared_run_key_cannot_be_raced_by_a_hostile_first_uploader(tmp_path, outboxes):
    server = start(tmp_path, "shared-key", shared_keys=[(KEY_A.key_id, ("hospital-a", "hospital-b"))])
    try:
        with pytest.raises(ServiceError) as err:  # mallory is first, with its own key
            upload(server, "mallory", outboxes["m-train"])
        assert "FAILED_PRECONDITION" in str(err.value)
        with pytest.raises(ServiceError) as err:  # and the run's key is not mallory's to use
            upload(server, "mallory", outboxes["a-train"], new_key_domain=True)
        assert "PERMISSION_DENIED" in str(err.value)
        assert upload(server, "hospital-b", outboxes["a-train"]).committed
    finally:
        server.service.stop(0)


@pytest.mark.parametrize("entry, message", [
    ({"key_id": "k1", "owners": ["hospital-a", "nobody"]}, "nobody not in ingest.owners"),
    ({"key_id": "k1", "owners": ["hospital-a"]}, "at least two owners"),
    ({"key_id": "../k", "owners": ["hospital-a", "hospital-b"]}, "is not a key id"),
])
def test_bad_shared_keys_are_refused_by_check(tmp_path, entry, message):
    doc = {"name": "keys", "task": {"classes": CLASSES},
           "ingest": {"insecure_loopback": True, "shared_keys": [entry],
                      "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in TOKENS.items()]}}
    with pytest.raises(ConfigError, match=message):
        parse_config(doc)
