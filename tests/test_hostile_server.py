"""The owner trusts nothing the server sends: a real gRPC server on 127.0.0.1 that lies about the
task, and shard folders with hostile names, against the owner agent."""
from __future__ import annotations

import io
import json
import stat
import tarfile
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from owners.agent import run_agent
from owners.cipher import CloudCanDecrypt
from owners.decrypt import decrypt_folder
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.errors import OwnerError, ServiceError
from owners.keys import OwnerKey
from owners.upload import Connection
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.shards import ManifestError
from protocol.task import Task, TaskError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample" / "test"
CLASSES = tuple(sorted(p.name for p in SAMPLE.iterdir()))
KEY = OwnerKey("owner", bytes(range(32)))
TOKEN = "hostile-server-test-token"


class LyingIngest(pb_grpc.IngestServicer):
    """Answers GetTask with whatever the test sets; refuses everything else."""

    def __init__(self, task: pb.Task) -> None:
        self.task = task

    def GetTask(self, request, context):
        return self.task


@pytest.fixture
def lying_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = LyingIngest(pb.Task())
    pb_grpc.add_IngestServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, Connection(f"127.0.0.1:{port}", TOKEN, retries=1)
    server.stop(None)


def honest_task(**changes) -> pb.Task:
    message = Task(CLASSES).to_pb(pb, "run-1", "clinic")
    for name, value in changes.items():
        setattr(message, name, value)
    return message


@pytest.mark.parametrize("changes, error, words", [
    ({"run_name": "../../escaped"}, ServiceError, "run name"),
    ({"run_name": "/tmp/absolute"}, ServiceError, "run name"),
    ({"owner_id": ".."}, ServiceError, "owner id"),
    ({"owner_id": "a/../../b"}, ServiceError, "owner id"),
    ({"image_size": 65536, "block_size": 16}, TaskError, "image_size"),
    ({"image_size": 32, "block_size": 32}, CloudCanDecrypt, "--accept-cloud-can-decrypt"),  # one block: 96 ciphertexts
])
def test_a_lying_task_is_refused_before_anything_is_written(lying_server, tmp_path, monkeypatch, changes, error,
                                                             words):
    servicer, conn = lying_server
    servicer.task = honest_task(**changes)
    home = tmp_path / "home"
    monkeypatch.setenv("OWNER_AGENT_HOME", str(home))
    before = set(tmp_path.rglob("*"))
    with pytest.raises(error, match=words):
        run_agent(KEY, SAMPLE, conn, "train", progress=False)
    assert set(tmp_path.rglob("*")) == before  # no outbox, no folder anywhere


def test_weak_geometry_is_the_owners_explicit_choice(lying_server, tmp_path, monkeypatch):
    servicer, conn = lying_server
    servicer.task = honest_task(image_size=32, block_size=32)
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    with pytest.raises(OwnerError):  # accepted, then the lying server refuses the upload
        run_agent(KEY, SAMPLE, conn, "train", progress=False, accept_cloud_can_decrypt=True)
    assert list((tmp_path / "home" / "outbox").rglob("manifest.json"))  # it did encrypt, as asked


def test_an_existing_folder_is_never_chmod_ed(tmp_path):
    out = tmp_path / "shared-folder"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    encrypt_folder(SAMPLE, out, KEY, EncryptSettings(task=Task(CLASSES)), progress=False)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    local = out / "local"
    assert stat.S_IMODE(local.stat().st_mode) == 0o700  # created here: private
    for name in ("index.jsonl", "report.json"):  # sample id -> source file name, reasons
        assert stat.S_IMODE((local / name).stat().st_mode) == 0o600, name


def _shard_with(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_decrypt_writes_nothing_outside_out_whatever_the_names(tmp_path):
    outbox = tmp_path / "outbox"
    encrypt_folder(SAMPLE, outbox, KEY, EncryptSettings(task=Task(CLASSES), shard_images=500), progress=False)
    manifest = json.loads((outbox / "manifest.json").read_text())
    hostile = dict(manifest, classes=["../../escaped", *manifest["classes"][1:]])
    (outbox / "manifest.json").write_text(json.dumps(hostile))
    with pytest.raises(ManifestError, match="classes"):
        decrypt_folder(outbox, tmp_path / "out", KEY)
    (outbox / "manifest.json").write_text(json.dumps(manifest))
    shard = outbox / manifest["shards"][0]["name"]
    shard.chmod(0o644)
    shard.write_bytes(_shard_with("../../escaped.png", b"x"))
    with pytest.raises(ManifestError):  # the sha256 no longer matches, and the member name is refused anyway
        decrypt_folder(outbox, tmp_path / "out", KEY)
    from protocol.shards import iter_samples

    with pytest.raises(ManifestError, match="unexpected member"):
        list(iter_samples(shard))
    assert not list(tmp_path.rglob("escaped*"))
