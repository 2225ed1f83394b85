"""The ingest service, started for real on 127.0.0.1, with real owner-agent uploads."""
import base64
import hashlib
import os
import sqlite3
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from orchestrator.auth import token_sha256
from orchestrator.config import parse_config
from orchestrator.ingest import start_ingest
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from owners.upload import Connection, IngestClient, ServiceError, upload_outbox
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.task import Task

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample" / "test"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOKENS = {"hospital-a": "token-a-7f3e9d1c", "hospital-b": "token-b-2a6c8e0f"}
KEY_A = OwnerKey("a", hashlib.sha256(b"key a").digest())
KEY_B = OwnerKey("b", hashlib.sha256(b"key b").digest())
CALL = 10  # seconds: deadline of every raw call in these tests


def config_dict(store: Path, listen: str = "127.0.0.1:50051") -> dict:
    return {
        "name": "test-run",
        "task": {"classes": CLASSES, "image_size": 32, "block_size": 16, "scheme": "color"},
        "ingest": {"listen": listen, "store": str(store), "insecure_loopback": True,
                   "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in TOKENS.items()]},
    }


@pytest.fixture
def server(tmp_path):
    cfg = parse_config(config_dict(tmp_path / "store"))
    service = start_ingest(cfg, listen="127.0.0.1:0")
    yield SimpleNamespace(addr=f"127.0.0.1:{service.port}", store=service.store, root=service.store.root)
    service.stop(0)


@pytest.fixture(scope="module")
def outboxes(tmp_path_factory):
    """Two owners' encrypted test splits, four shards each."""
    root = tmp_path_factory.mktemp("outboxes")
    settings = EncryptSettings(task=Task(tuple(CLASSES)), split="test", shard_images=50)
    for name, key in (("a", KEY_A), ("b", KEY_B)):
        encrypt_folder(SAMPLE, root / name, key, settings, progress=False)
    return SimpleNamespace(a=root / "a", b=root / "b")


def client(server, owner="hospital-a", **kw) -> IngestClient:
    return IngestClient(Connection(server.addr, TOKENS[owner], retries=3, **kw), log=lambda m: None)


def stub(server) -> pb_grpc.IngestStub:
    return pb_grpc.IngestStub(grpc.insecure_channel(server.addr))


def auth(owner="hospital-a"):
    return (("authorization", f"Bearer {TOKENS[owner]}"),)


def catalog(server, sql):
    with sqlite3.connect(server.root / "catalog.sqlite") as db:
        return db.execute(sql).fetchall()


def stored_objects(server) -> list[Path]:
    return sorted(p for p in (server.root / "objects").rglob("*") if p.is_file())


def open_a(server, outbox) -> pb.DatasetState:
    return stub(server).OpenDataset(pb.OpenDatasetRequest(manifest_json=(outbox / "manifest.json").read_bytes()),
                                    metadata=auth(), timeout=CALL)


def shard_bytes(outbox, state, i=0) -> bytes:
    return (outbox / state.shards[i].name).read_bytes()


def chunk(data: bytes, header=None) -> pb.ShardChunk:
    c = pb.ShardChunk(data=data, data_crc32=zlib.crc32(data))
    if header is not None:
        c.header.CopyFrom(header)
    return c


# ------------------------------------------------------------------ the normal path


def test_upload_commits_and_catalog_matches_the_manifest(server, outboxes):
    c = client(server)
    assert c.get_task().owner_id == "hospital-a"
    state = upload_outbox(outboxes.a, c)
    assert state.committed and state.images == 200 and len(state.shards) == 4
    rows = catalog(server, "SELECT s.name, s.sha256, s.images FROM dataset_shards s JOIN datasets d "
                           "ON d.id = s.dataset_id WHERE d.owner = 'hospital-a' AND d.committed = 1 ORDER BY s.name")
    manifest = __import__("json").loads((outboxes.a / "manifest.json").read_text())
    assert rows == [(s["name"], s["sha256"], s["count"]) for s in manifest["shards"]]
    for path in stored_objects(server):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    assert len(stored_objects(server)) == 4
    # a rerun sends nothing: count the bytes the second run streams
    sent = []
    c.upload_shard = lambda *a, **k: sent.append(a)
    again = upload_outbox(outboxes.a, c)
    assert sent == [] and again.dataset_id == state.dataset_id and again.committed


def test_two_owners_upload_at_once(server, outboxes):
    results, errors = {}, []

    def run(owner, outbox):
        try:
            results[owner] = upload_outbox(outbox, client(server, owner))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in (("hospital-a", outboxes.a), ("hospital-b", outboxes.b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results["hospital-a"].key_id == KEY_A.key_id and results["hospital-b"].key_id == KEY_B.key_id
    assert [r.images for r in results.values()] == [200, 200]
    assert len(stored_objects(server)) == 8


# ------------------------------------------------------------------ refusals store nothing


def test_missing_or_wrong_token_is_unauthenticated_and_stores_nothing(server, outboxes):
    manifest = (outboxes.a / "manifest.json").read_bytes()
    s = stub(server)
    header = pb.ShardHeader(dataset_id="d", shard_sha256="0" * 64)
    for metadata in ((), (("authorization", "Bearer not-a-token"),), (("authorization", "Basic abc"),)):
        for call in (lambda m=metadata: s.GetTask(pb.GetTaskRequest(), metadata=m, timeout=CALL),
                     lambda m=metadata: s.OpenDataset(pb.OpenDatasetRequest(manifest_json=manifest), metadata=m,
                                                      timeout=CALL),
                     lambda m=metadata: s.UploadShard(iter([chunk(b"x" * 10, header)]), metadata=m, timeout=CALL)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert catalog(server, "SELECT COUNT(*) FROM datasets") == [(0,)]
    assert stored_objects(server) == [] and not any((server.root / "incoming").rglob("*.part"))
    bad = IngestClient(Connection(server.addr, "wrong"), log=lambda m: None)
    with pytest.raises(ServiceError, match="rejected the token"):
        upload_outbox(outboxes.a, bad)


def test_corrupted_chunk_is_refused_and_not_stored(server, outboxes):
    state = open_a(server, outboxes.a)
    data = shard_bytes(outboxes.a, state)
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=0)
    bad = pb.ShardChunk(header=header, data=data[:4096], data_crc32=zlib.crc32(data[:4096]) ^ 1)
    with pytest.raises(grpc.RpcError) as err:
        stub(server).UploadShard(iter([bad]), metadata=auth(), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert open_a(server, outboxes.a).shards[0].received == 0
    assert stored_objects(server) == []


def test_wrong_offset_is_refused(server, outboxes):
    state = open_a(server, outboxes.a)
    data = shard_bytes(outboxes.a, state)
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=512)
    with pytest.raises(grpc.RpcError) as err:
        stub(server).UploadShard(iter([chunk(data[512:1024], header)]), metadata=auth(), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds 0 bytes" in err.value.details()
    assert open_a(server, outboxes.a).shards[0].received == 0 and stored_objects(server) == []


def test_oversized_message_is_refused(server, outboxes):
    state = open_a(server, outboxes.a)
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=0)
    with pytest.raises(grpc.RpcError) as err:
        stub(server).UploadShard(iter([chunk(os.urandom(3 << 20), header)]), metadata=auth(), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert open_a(server, outboxes.a).shards[0].received == 0 and stored_objects(server) == []


def test_complete_shard_with_wrong_content_is_discarded(server, outboxes):
    state = open_a(server, outboxes.a)
    data = bytearray(shard_bytes(outboxes.a, state))
    data[-1] ^= 0xFF  # every chunk is self-consistent, the whole is not the announced shard
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=0)
    with pytest.raises(grpc.RpcError) as err:
        stub(server).UploadShard(iter([chunk(bytes(data), header)]), metadata=auth(), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert open_a(server, outboxes.a).shards[0].received == 0 and stored_objects(server) == []


def test_partial_upload_resumes_from_the_servers_offset(server, outboxes):
    state = open_a(server, outboxes.a)
    data = shard_bytes(outboxes.a, state)
    half = len(data) // 2
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=0)
    reply = stub(server).UploadShard(iter([chunk(data[:half], header)]), metadata=auth(), timeout=CALL)
    assert reply.progress.received == half and not reply.progress.stored
    assert open_a(server, outboxes.a).shards[0].received == half
    with pytest.raises(grpc.RpcError):  # commit before every shard is stored
        stub(server).CommitDataset(pb.CommitDatasetRequest(dataset_id=state.dataset_id), metadata=auth(), timeout=CALL)
    final = upload_outbox(outboxes.a, client(server))
    assert final.committed and len(stored_objects(server)) == 4


def test_owners_cannot_touch_each_others_data(server, outboxes):
    a = upload_outbox(outboxes.a, client(server, "hospital-a"))
    s = stub(server)
    with pytest.raises(grpc.RpcError) as err:
        s.CommitDataset(pb.CommitDatasetRequest(dataset_id=a.dataset_id), metadata=auth("hospital-b"), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    header = pb.ShardHeader(dataset_id=a.dataset_id, shard_sha256=a.shards[0].sha256, offset=0)
    with pytest.raises(grpc.RpcError) as err:
        s.UploadShard(iter([chunk(b"junk", header)]), metadata=auth("hospital-b"), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # B announcing A's exact manifest gets a dataset of its own and must send every byte itself
    b_state = s.OpenDataset(pb.OpenDatasetRequest(manifest_json=(outboxes.a / "manifest.json").read_bytes(),
                                                  new_key_domain=True), metadata=auth("hospital-b"), timeout=CALL)
    assert b_state.dataset_id != a.dataset_id and not any(x.stored for x in b_state.shards)
    before = [p.stat().st_mtime_ns for p in stored_objects(server)]
    upload_outbox(outboxes.a, client(server, "hospital-b"), new_key_domain=True)
    assert [p.stat().st_mtime_ns for p in stored_objects(server)] == before  # stored once, untouched


def test_key_change_is_refused_unless_a_new_key_domain_is_asked_for(server, outboxes, tmp_path):
    upload_outbox(outboxes.a, client(server))
    other = tmp_path / "other"
    encrypt_folder(SAMPLE, other, KEY_B, EncryptSettings(task=Task(tuple(CLASSES)), split="train"), progress=False)
    with pytest.raises(ServiceError, match=f"key id {KEY_A.key_id}.*--new-key-domain"):
        upload_outbox(other, client(server))
    assert upload_outbox(other, client(server), new_key_domain=True).committed


def test_manifest_for_another_task_is_refused(server, tmp_path):
    out = tmp_path / "big"
    encrypt_folder(SAMPLE, out, KEY_A, EncryptSettings(task=Task(tuple(CLASSES), image_size=64)), progress=False)
    with pytest.raises(ServiceError, match="image_size is 64 but the task says 32"):
        upload_outbox(out, client(server))
    assert catalog(server, "SELECT COUNT(*) FROM datasets") == [(0,)]


def test_canary_key_never_reaches_the_server(server, tmp_path, monkeypatch):
    from owners.agent import run_agent

    canary = b"CANARY-ingest-0123456789abcdefgh"
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    run_agent(OwnerKey("canary", canary), SAMPLE, Connection(server.addr, TOKENS["hospital-a"]), "test",
              progress=False, accept_cloud_can_decrypt=True)
    needles = [canary, canary.hex().encode(), base64.b64encode(canary), TOKENS["hospital-a"].encode()]
    files = [p for p in server.root.rglob("*") if p.is_file()]
    assert any(p.name == "ingest.log" for p in files) and len(stored_objects(server)) == 1
    for path in files:
        blob = path.read_bytes()
        assert not [n for n in needles if n in blob], path
