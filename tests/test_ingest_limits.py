"""Resource limits at ingest: one owner, or one stalled client, must not block ingest for everyone.

A real ingest server on 127.0.0.1 with small limits from the config; silent clients are real gRPC
streams whose request generator blocks. Nothing here sleeps for timing: every wait is on an event,
a condition or a future, with a bound.
"""
import json
import os
import signal
import sqlite3
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from orchestrator import store as store_module
from orchestrator.config import parse_config
from orchestrator.ingest import start_ingest
from owners.upload import Connection, IngestClient, ServiceError, upload_outbox
from protocol.proto import ingest_pb2 as pb
from tests import test_ingest, test_ingest_crash
from tests.test_ingest import CALL, auth, chunk, client, config_dict, shard_bytes, stored_objects, stub

outboxes = test_ingest.outboxes  # four shards per owner, by name as a fixture
crash_setup = test_ingest_crash.setup  # real processes: the ingest server and owner-agents
BOUND = 20  # seconds: upper bound on any wait below (they end far sooner when the code is right)


@pytest.fixture
def make_server(tmp_path):
    """Start an ingest server with the given ``ingest:`` settings; several may be started in turn."""
    services, silent = [], threading.Event()

    def start(**ingest):
        doc = config_dict(tmp_path / "store")
        doc["ingest"].update(ingest)
        service = start_ingest(parse_config(doc), listen="127.0.0.1:0")
        services.append(service)
        return SimpleNamespace(addr=f"127.0.0.1:{service.port}", service=service, store=service.store,
                               root=service.store.root, limits=service.limits, silent=silent)

    yield start
    silent.set()  # silent clients' generators return
    for service in services:
        service.stop(0)


def silent_stream(server, owner="hospital-a", first=()):
    """An upload stream that sends ``first`` (maybe nothing) and then nothing more until the test ends."""
    def requests():
        yield from first
        server.silent.wait()

    channel = grpc.insecure_channel(server.addr)
    return stub_of(channel).UploadShard.future(requests(), metadata=auth(owner), timeout=120)


def stub_of(channel):
    from protocol.proto import ingest_pb2_grpc as pb_grpc

    return pb_grpc.IngestStub(channel)


def half_shard(server, outbox, i=0):
    """The header and the first half of shard ``i`` of hospital-a's outbox (dataset opened)."""
    state = test_ingest.open_a(server, outbox)
    data = shard_bytes(outbox, state, i)
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[i].sha256, offset=0)
    return state, data, [chunk(data[: len(data) // 2], header)]


def error_of(future) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        future.result(timeout=BOUND)
    return err.value


# ------------------------------------------------------------------ streams per owner, idle streams


def test_streams_beyond_the_owners_cap_are_refused_at_once_and_others_are_served(make_server):
    server = make_server(max_streams_per_owner=2, stream_idle_timeout_s=600, workers=4)
    held = [silent_stream(server) for _ in range(2)]  # they never send a byte
    assert server.limits.wait_for_streams("hospital-a", 2, BOUND)
    err = error_of(silent_stream(server))  # refused before any message: it never sends one
    assert err.code() == grpc.StatusCode.ABORTED and "max_streams_per_owner" in err.details()
    for owner in ("hospital-b", "hospital-a"):  # the pool is not taken by silent streams
        task = stub(server).GetTask(pb.GetTaskRequest(), metadata=auth(owner), timeout=2)
        assert task.owner_id == owner
    assert not any(f.done() for f in held)


def test_too_many_streams_is_retried_by_the_agent_until_a_slot_frees(make_server, outboxes):
    server = make_server(max_streams_per_owner=2, stream_idle_timeout_s=1)
    held = [silent_stream(server) for _ in range(2)]
    assert server.limits.wait_for_streams("hospital-a", 2, BOUND)
    messages = []
    c = IngestClient(Connection(server.addr, test_ingest.TOKENS["hospital-a"], retries=8), log=messages.append)
    state = upload_outbox(outboxes.a, c, progress=False)  # backs off while the silent streams hold the slots
    assert state.committed and len(stored_objects(server)) == 4
    assert any("ABORTED" in m and "max_streams_per_owner" in m for m in messages)
    assert [error_of(f).code() for f in held] == [grpc.StatusCode.CANCELLED] * 2  # ended as idle


def test_a_silent_stream_is_ended_after_the_idle_timeout_and_the_shard_resumes(make_server, outboxes):
    server = make_server(stream_idle_timeout_s=0.5)
    state, data, first = half_shard(server, outboxes.a)
    stalled = silent_stream(server, first=first)
    assert error_of(stalled).code() == grpc.StatusCode.CANCELLED  # within BOUND, not the call's 120 s
    assert server.limits.wait_for_streams("hospital-a", 0, BOUND)  # its slot is back
    assert test_ingest.open_a(server, outboxes.a).shards[0].received == len(data) // 2  # what it sent is kept
    assert upload_outbox(outboxes.a, client(server), progress=False).committed


def test_a_rerun_takes_over_from_a_stalled_stream_at_once(make_server, outboxes):
    server = make_server(stream_idle_timeout_s=3600)  # the idle timeout would not save the rerun
    _, data, first = half_shard(server, outboxes.a)
    stalled = silent_stream(server, first=first)  # an agent stopped with SIGSTOP mid-shard
    assert server.limits.wait_for_streams("hospital-a", 1, BOUND)
    c = client(server)  # retries=3: a refusal for the shard would exhaust them within seconds
    state = upload_outbox(outboxes.a, c, progress=False)
    assert state.committed and len(stored_objects(server)) == 4
    assert error_of(stalled).code() == grpc.StatusCode.CANCELLED


# ------------------------------------------------------------------ the quota


def test_quota_exceeded_is_resource_exhausted_not_retried_and_nothing_is_stored(make_server, outboxes):
    total = sum(p.stat().st_size for p in outboxes.a.glob("*.tar"))
    server = make_server(owner_quota_bytes=total - 1)
    c = client(server)  # retries=3
    calls = []
    real = c.stub
    c.stub = SimpleNamespace(OpenDataset=lambda *a, **k: calls.append(1) or real.OpenDataset(*a, **k),
                             UploadShard=lambda *a, **k: calls.append(2) or real.UploadShard(*a, **k))
    with pytest.raises(ServiceError, match=r"open dataset: RESOURCE_EXHAUSTED: owner hospital-a holds 0 bytes; "
                                           rf"this dataset needs {total:,} more, over its quota of {total - 1:,} "
                                           r"bytes \(ingest.owner_quota_bytes\).*Stopped"):
        upload_outbox(outboxes.a, c, progress=False)
    assert calls == [1]  # asked once, told no, never retried, nothing sent
    assert stored_objects(server) == [] and not list((server.root / "incoming").rglob("*.part"))
    with sqlite3.connect(server.root / "catalog.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM datasets").fetchone() == (0,)


def test_each_stream_is_checked_against_the_quota_counting_partials_and_open_streams(make_server, outboxes):
    """Datasets opened while there was room (several at once) are checked again stream by stream."""
    server = make_server()
    state, data, first = half_shard(server, outboxes.a, 0)
    sizes = [s.size for s in state.shards]
    server.store.owner_quota_bytes = sizes[0] + sizes[1] - 1  # shard 0 and 1 do not both fit
    stalled = silent_stream(server, first=first)  # shard 0 counts at its full size while streaming
    assert server.limits.wait_for_streams("hospital-a", 1, BOUND)
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[1].sha256, offset=0)
    with pytest.raises(grpc.RpcError) as err:
        stub(server).UploadShard(iter([chunk(b"x", header)]), metadata=auth(), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"shard {state.shards[1].sha256[:12]}... ({sizes[1]:,} bytes) would pass its quota" in err.value.details()
    assert not (server.root / "incoming" / "hospital-a" / f"{state.shards[1].sha256}.part").exists()
    assert not stalled.done()
    assert server.store.owner_usage("hospital-a") == sizes[0]


# ------------------------------------------------------------------ abandoned partial uploads


def test_an_abandoned_partial_upload_expires_at_start_and_periodically(make_server, outboxes):
    server = make_server(partial_expiry_s=3600)
    state, data, first = half_shard(server, outboxes.a, 0)
    stub(server).UploadShard(iter(first), metadata=auth(), timeout=CALL)  # half a shard, then the agent is gone
    partial = server.root / "incoming" / "hospital-a" / f"{state.shards[0].sha256}.part"
    assert partial.stat().st_size == len(data) // 2
    hour_ago = time.time() - 3600 - 60
    os.utime(partial, (hour_ago, hour_ago))
    server.service.stop(0)
    server = make_server(partial_expiry_s=3600)  # the sweep at start
    assert not partial.exists()
    assert test_ingest.open_a(server, outboxes.a).shards[0].received == 0

    server.service.stop(0)
    server = make_server(partial_expiry_s=1)  # then a sweep every 0.25 s
    _, _, first1 = half_shard(server, outboxes.a, 1)
    stub(server).UploadShard(iter(first1), metadata=auth(), timeout=CALL)
    abandoned = server.root / "incoming" / "hospital-a" / f"{state.shards[1].sha256}.part"
    _, _, first2 = half_shard(server, outboxes.a, 2)
    open_stream = silent_stream(server, first=first2)  # a live stream's file is never expired
    streaming = server.root / "incoming" / "hospital-a" / f"{state.shards[2].sha256}.part"
    assert wait_until(lambda: not abandoned.exists(), server)
    assert wait_until(lambda: streaming.exists() and time.time() - streaming.stat().st_mtime > 2, server)
    runs = server.service.sweeper.runs
    assert server.service.sweeper.wait_for_runs(runs + 2, BOUND)  # sweeps that saw it old
    assert streaming.exists() and not open_stream.done()


def wait_until(condition, server) -> bool:
    """Wait for ``condition`` across sweeper runs (each a fraction of a second), within BOUND."""
    sweeper = server.service.sweeper
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            return False
        sweeper.wait_for_runs(sweeper.runs + 1, BOUND)
    return True


# ------------------------------------------------------------------ resuming without re-hashing


def test_resume_does_not_read_the_partial_file_again(make_server, outboxes, monkeypatch):
    reads = []
    real = store_module.hash_file
    monkeypatch.setattr(store_module, "hash_file", lambda path: reads.append(path) or real(path))
    server = make_server()
    state, data, _ = half_shard(server, outboxes.a, 0)
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=0)
    third = len(data) // 3
    for start, end in ((0, third), (third, 2 * third)):  # two streams, each ends early
        header.offset = start
        reply = stub(server).UploadShard(iter([chunk(data[start:end], header)]), metadata=auth(), timeout=CALL)
        assert reply.progress.received == end
    assert reads == []  # the second stream went on from the first one's sha256 state
    server.service.stop(0)
    server = make_server()  # after a restart the state is gone: one read of the partial file
    header.offset = 2 * third
    reply = stub(server).UploadShard(iter([chunk(data[2 * third:], header)]), metadata=auth(), timeout=CALL)
    assert reply.progress.stored and len(reads) == 1
    assert upload_outbox(outboxes.a, client(server), progress=False).committed
    assert len(reads) == 1


# ------------------------------------------------------------------ a full disk


def test_a_full_disk_while_writing_is_resource_exhausted(make_server, outboxes):
    server = make_server()
    state, data, _ = half_shard(server, outboxes.a, 0)
    partial = server.root / "incoming" / "hospital-a" / f"{state.shards[0].sha256}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.symlink_to("/dev/full")  # every write: ENOSPC, from the kernel
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=0)
    with pytest.raises(grpc.RpcError) as err:
        stub(server).UploadShard(iter([chunk(data, header)]), metadata=auth(), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk is full" in err.value.details() and "No space left" in err.value.details()
    assert stored_objects(server) == []
    partial.unlink()  # the operator made room: the same upload goes through
    assert upload_outbox(outboxes.a, client(server), progress=False).committed


def test_a_full_catalog_is_resource_exhausted_and_not_retried(make_server, outboxes):
    server = make_server()
    store = server.store
    pages = store._query("PRAGMA page_count")[0][0]
    store._query(f"PRAGMA max_page_count = {pages}")  # the catalog cannot grow: SQLITE_FULL
    doc = json.loads((outboxes.a / "manifest.json").read_text())
    manifest = json.dumps({**doc, "producer": "x" * 20_000}).encode()  # needs pages the catalog cannot get
    c = client(server)
    calls = []
    open_dataset = c.stub.OpenDataset
    c.stub = SimpleNamespace(OpenDataset=lambda *a, **k: calls.append(1) or open_dataset(*a, **k))
    with pytest.raises(ServiceError, match="RESOURCE_EXHAUSTED: the server's disk is full: its catalog cannot "
                                           "grow .*database or disk is full"):
        c.open_dataset(manifest, False)
    assert calls == [1]
    with sqlite3.connect(server.root / "catalog.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM datasets").fetchone() == (0,)


# ------------------------------------------------------------------ the agent never retries a bad request


def test_invalid_argument_is_never_retried(make_server, outboxes):
    server = make_server()
    c = client(server)  # retries=3
    calls = []
    real = c.stub
    c.stub = SimpleNamespace(OpenDataset=lambda *a, **k: calls.append(1) or real.OpenDataset(*a, **k))
    with pytest.raises(ServiceError, match="open dataset: INVALID_ARGUMENT"):
        c.open_dataset(b"{not a manifest", False)
    assert calls == [1]
    # a stream refused as INVALID_ARGUMENT is not resumed either: a chunk past the shard's end
    state = test_ingest.open_a(server, outboxes.a)
    header = pb.ShardHeader(dataset_id=state.dataset_id, shard_sha256=state.shards[0].sha256, offset=0)
    too_long = shard_bytes(outboxes.a, state) + b"x"
    with pytest.raises(grpc.RpcError) as err:
        stub(server).UploadShard(iter([chunk(too_long, header)]), metadata=auth(), timeout=CALL)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    from owners.upload import RESUMABLE, RETRYABLE

    assert grpc.StatusCode.INVALID_ARGUMENT not in RETRYABLE + RESUMABLE
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in RETRYABLE + RESUMABLE


def test_connection_limits_reach_the_grpc_server(make_server):
    """The settings are the installed grpc's channel arguments, and the open-file limit is raised."""
    import resource

    from orchestrator.ingest import server_options

    server = make_server(max_connections=1000, handshake_timeout_s=5, connection_idle_s=60)
    options = dict(server_options(parse_config(config_dict(server.root)).ingest))
    assert set(options) >= {"grpc.max_allowed_incoming_connections", "grpc.server_handshake_timeout_ms",
                            "grpc.max_connection_idle_ms", "grpc.keepalive_time_ms"}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert stub(server).GetTask(pb.GetTaskRequest(), metadata=auth(), timeout=CALL).owner_id == "hospital-a"



# ------------------------------------------------------------------ a stalled agent, for real


@pytest.mark.slow
def test_a_stopped_agents_rerun_is_not_blocked_by_it(crash_setup):
    """An agent stopped with SIGSTOP mid-upload holds its streams open; its rerun takes them over at
    once instead of being refused ("another upload ... is in progress") until their deadline."""
    tmp_path, port, procs = crash_setup
    test_ingest_crash.start_server(tmp_path, procs)
    stalled = test_ingest_crash.start_agent(tmp_path, port, "hospital-a", procs, "--max-rate", "300000")
    test_ingest_crash.wait_for_stored(tmp_path, "hospital-a", 2, stalled)
    incoming = tmp_path / "store" / "crash" / "incoming" / "hospital-a"
    deadline = time.monotonic() + test_ingest_crash.WAIT
    while not list(incoming.glob("*.part")):  # stopped mid-shard: it holds a stream (the crash tests' polling)
        assert time.monotonic() < deadline and stalled.poll() is None
        time.sleep(0.02)
    stalled.send_signal(signal.SIGSTOP)
    try:
        out = tmp_path / "agent-hospital-a.out"
        before = len(out.read_bytes())
        rerun = test_ingest_crash.start_agent(tmp_path, port, "hospital-a", procs)
        assert rerun.wait(test_ingest_crash.WAIT) == 0, out.read_text()[-2000:]
        log = out.read_bytes()[before:].decode()
        assert "another upload" not in log and "ABORTED" not in log, log[-2000:]
        test_ingest_crash.check_catalog_matches_outbox(tmp_path, "hospital-a")
    finally:
        stalled.send_signal(signal.SIGKILL)
        stalled.wait(10)
