"""Upload an outbox (manifest.json + shards) to the ingest service, resumably.

The server is the source of truth for progress: before each shard the client asks how many bytes
the server holds and streams from there, so a rerun after a crash (of either side) never resends
a finished shard and never duplicates one. Transient failures (server restarting, network down,
deadline) are retried with exponential backoff and jitter; every call has a deadline.

What is retried is decided by the status code alone, never by the message:
- retried with backoff (RETRYABLE): UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN, and ABORTED, which is
  also how the server says "this owner has too many upload streams open right now" (they end soon:
  done, idle or taken over) or "another stream of this shard is still finishing";
- an interrupted shard stream is also resumed (RESUMABLE) after FAILED_PRECONDITION (wrong offset),
  DATA_LOSS (damaged chunk) and CANCELLED (the server ended a stream that stalled, or that a newer
  stream of the same shard took over): the agent asks the server where to resume;
- never retried: RESOURCE_EXHAUSTED (the owner's quota is used up, or the server's disk is full:
  nothing changes until a person acts, so the agent stops with the server's message and says how
  to resume), INVALID_ARGUMENT (the request itself is wrong), and every other code.
"""
from __future__ import annotations

import os
import random
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from owners.cipher import CipherGeometry, privacy_gate, privacy_verdict
from owners.errors import ServiceError
from protocol.net import CHUNK_BYTES, MAX_MESSAGE_BYTES, is_loopback_host
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.shards import MANIFEST_NAME, Manifest
from protocol.task import Task, is_safe_name

TOKEN_ENV = "OWNER_AGENT_TOKEN"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.UNKNOWN)
# An interrupted shard upload also comes back as these: the server then says where to resume.
RESUMABLE = (*RETRYABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.CANCELLED)


def backoff_delay(attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based): exponential up to 30 s, with +-50% jitter."""
    return min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())


def service_error(what: str, exc: grpc.RpcError) -> ServiceError:
    """The owner-facing error for a failed call."""
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return ServiceError(f"{what}: UNAUTHENTICATED: the server rejected the token ({exc.details()})")
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ServiceError(f"{what}: RESOURCE_EXHAUSTED: {exc.details()}. Stopped: retrying will not help until "
                            "the cloud's operator makes room; then rerun the same command to resume")
    return ServiceError(f"{what}: {exc.code().name}: {exc.details()}")


@dataclass(frozen=True)
class ServerTask:
    """The task as the server sent it, with the run it belongs to and who the server says we are."""

    task: Task
    run_name: str
    owner_id: str

    @classmethod
    def from_pb(cls, message: pb.Task) -> ServerTask:
        """Validated on arrival: the task like any other, and the names the agent puts in paths."""
        for what, name in (("run name", message.run_name), ("owner id", message.owner_id)):
            if not is_safe_name(name):
                raise ServiceError(f"the server sent {what} {name[:80]!r}: not a plain name (letters, digits, "
                                   "'.', '_', '-'); refusing to use it in a path")
        return cls(Task.from_pb(message), message.run_name, message.owner_id)

    def checked_privacy(self, accept_cloud_can_decrypt: bool, log) -> None:
        """Before images encrypted for this task are written or sent: show the privacy verdict for the
        task's geometry and key mode, and refuse ``broken`` unless the owner accepted it."""
        if self.task.encrypted:
            privacy_gate(CipherGeometry.for_task(self.task), self.task.key_mode, accept_cloud_can_decrypt, log)

    def privacy_note(self) -> str | None:
        """The verdict as information only, for commands whose images never leave the machine."""
        if not self.task.encrypted:
            return None
        return privacy_verdict(CipherGeometry.for_task(self.task), self.task.key_mode)[1]

    def describe(self) -> str:
        t = self.task
        return (f"task {self.run_name!r}: {len(t.classes)} classes, {t.image_size}x{t.image_size}, {t.scheme} "
                f"(block {t.block_size}); you are {self.owner_id!r}")


@dataclass(frozen=True)
class Connection:
    server: str  # HOST:PORT
    token: str
    ca_file: Path | None = None  # server's CA (PEM); None: system roots, or plaintext on loopback
    client_cert: Path | None = None  # mutual TLS
    client_key: Path | None = None
    insecure: bool = False  # plaintext; allowed on loopback only
    retries: int = 8  # attempts per step before giving up
    call_timeout: float = 30.0  # seconds, small calls
    min_upload_rate: float = 256 * 1024  # bytes/s assumed when sizing an upload's deadline
    max_rate: float | None = None  # bytes/s cap on the whole upload (shared hospital links); None: no cap
    streams: int = 2  # shards uploaded at once

    def __repr__(self) -> str:  # never print the token
        return f"Connection(server={self.server!r}, tls={not self.insecure})"


def read_token(token_file: str | None) -> str:
    """The owner's upload token from a file (0600) or $OWNER_AGENT_TOKEN; never from argv."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ServiceError(f"token file {path} does not exist")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ServiceError(f"token file {path} is readable by other users; chmod 600 {path}")
        token = path.read_text("utf-8").strip()
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ServiceError(f"no upload token: pass --token-file FILE or set {TOKEN_ENV}")
    return token


def open_channel(conn: Connection) -> grpc.Channel:
    host = conn.server.rpartition(":")[0]
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", 4 << 20),
               # reconnect soon after a server restart (gRPC's default backoff grows to 2 minutes)
               ("grpc.initial_reconnect_backoff_ms", 500),
               ("grpc.max_reconnect_backoff_ms", 5000)]
    plaintext = conn.insecure or (conn.ca_file is None and conn.client_cert is None and is_loopback_host(host))
    if plaintext:
        if not is_loopback_host(host):
            raise ServiceError(f"refusing to send the token in clear text to {conn.server}: plaintext is for "
                               "loopback only")
        return grpc.insecure_channel(conn.server, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=conn.ca_file.read_bytes() if conn.ca_file else None,
        private_key=conn.client_key.read_bytes() if conn.client_key else None,
        certificate_chain=conn.client_cert.read_bytes() if conn.client_cert else None,
    )
    return grpc.secure_channel(conn.server, creds, options=options)


class IngestClient:
    def __init__(self, conn: Connection, log: Callable[[str], None] | None = None) -> None:
        self.conn = conn
        self.channel = open_channel(conn)
        self.stub = pb_grpc.IngestStub(self.channel)
        self.metadata = (("authorization", f"Bearer {conn.token}"),)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def close(self) -> None:
        self.channel.close()

    def _retry(self, what: str, call: Callable[[], object]) -> object:
        """Run ``call``; retry transient failures with backoff; turn the rest into ServiceError."""
        for attempt in range(self.conn.retries):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.conn.retries - 1:
                    raise service_error(what, exc) from None
                delay = backoff_delay(attempt)
                self.log(f"{what}: {exc.code().name} ({exc.details()}); retrying in {delay:.1f} s "
                         f"(attempt {attempt + 2} of {self.conn.retries})")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def get_task(self) -> ServerTask:
        message = self._retry("get task", lambda: self.stub.GetTask(
            pb.GetTaskRequest(), metadata=self.metadata, timeout=self.conn.call_timeout))
        return ServerTask.from_pb(message)

    def open_dataset(self, manifest_json: bytes, new_key_domain: bool) -> pb.DatasetState:
        return self._retry("open dataset", lambda: self.stub.OpenDataset(
            pb.OpenDatasetRequest(manifest_json=manifest_json, new_key_domain=new_key_domain),
            metadata=self.metadata, timeout=self.conn.call_timeout))

    def commit(self, dataset_id: str) -> pb.DatasetState:
        return self._retry("commit dataset", lambda: self.stub.CommitDataset(
            pb.CommitDatasetRequest(dataset_id=dataset_id), metadata=self.metadata,
            timeout=self.conn.call_timeout * 4))

    def upload_shard(self, path: Path, dataset_id: str, sha256: str, offset: int,
                     on_bytes: Callable[[int], None]) -> pb.ShardState:
        size = path.stat().st_size
        stream_rate = None if self.conn.max_rate is None else self.conn.max_rate / self.conn.streams
        slowest = min(self.conn.min_upload_rate, stream_rate or float("inf"))  # bytes/s the deadline assumes
        deadline = self.conn.call_timeout + (size - offset) / slowest
        return self.stub.UploadShard(_chunks(path, dataset_id, sha256, offset, on_bytes, stream_rate),
                                     metadata=self.metadata, timeout=deadline)


def _chunks(path: Path, dataset_id: str, sha256: str, offset: int, on_bytes: Callable[[int], None],
            max_rate: float | None) -> Iterator[pb.ShardChunk]:
    header = pb.ShardHeader(dataset_id=dataset_id, shard_sha256=sha256, offset=offset)
    # With a rate cap, send about four chunks a second so the cap is smooth.
    chunk_bytes = CHUNK_BYTES if max_rate is None else max(4096, min(CHUNK_BYTES, int(max_rate / 4)))
    started, sent = time.monotonic(), 0
    with open(path, "rb") as f:
        f.seek(offset)
        first = True
        while True:
            if max_rate is not None:
                ahead = sent / max_rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # bandwidth cap
            data = f.read(chunk_bytes)
            sent += len(data)
            if not data and not first:
                return
            chunk = pb.ShardChunk(data=data, data_crc32=zlib.crc32(data))
            if first:
                chunk.header.CopyFrom(header)
                first = False
            yield chunk
            on_bytes(len(data))
            if not data:
                return


def upload_outbox(outbox: Path, client: IngestClient, new_key_domain: bool = False,
                  progress: bool | None = None) -> pb.DatasetState:
    """Upload every shard of ``outbox`` the server does not hold yet, then commit the dataset.

    ``client.conn.streams`` shards travel at once, so one shard's verification and fsync on the
    server overlap the next one's transfer (and long-latency links stay busy). After any failure
    the server's answer to OpenDataset (bytes held per shard) is the only resume point.
    """
    manifest_json = (Path(outbox) / MANIFEST_NAME).read_bytes()
    manifest = Manifest.parse(manifest_json, str(Path(outbox) / MANIFEST_NAME))
    state = client.open_dataset(manifest_json, new_key_domain)
    _check_server_listing(state, manifest)
    bar = tqdm(total=sum(s.size for s in state.shards), unit="B", unit_scale=True, desc="upload", file=sys.stderr,
               disable=progress is False or (progress is None and not sys.stderr.isatty()))
    try:
        for attempt in range(client.conn.retries):
            bar.n = sum(s.received for s in state.shards)
            bar.refresh()
            pending = [s for s in state.shards if not s.stored]
            if not pending:
                return client.commit(state.dataset_id)
            failures = _send_shards(outbox, client, state.dataset_id, pending, bar.update)
            if failures:
                delay = backoff_delay(attempt)
                client.log(f"upload: {len(failures)} shard(s) interrupted ({failures[0].code().name}: "
                           f"{failures[0].details()}); asking the server where to resume in {delay:.1f} s")
                time.sleep(delay)
            state = client.open_dataset(manifest_json, new_key_domain)
    finally:
        bar.close()
    if any(not s.stored for s in state.shards):
        missing = sum(not s.stored for s in state.shards)
        raise ServiceError(f"gave up after {client.conn.retries} attempts; {missing} shard(s) not stored. "
                           "Rerun the same command to resume")
    return client.commit(state.dataset_id)


def _check_server_listing(state: pb.DatasetState, manifest: Manifest) -> None:
    files = {s.name: s for s in manifest.shards}
    for shard in state.shards:
        info = files.get(shard.name)
        if info is None or info.sha256 != shard.sha256:
            raise ServiceError(f"server lists shard {shard.name} that this outbox does not hold")


def _send_shards(outbox: Path, client: IngestClient, dataset_id: str, pending: list,
                 on_bytes: Callable[[int], None]) -> list[grpc.RpcError]:
    """Upload ``pending`` shards concurrently; returns the resumable failures, raises on the others."""
    def send(shard: pb.ShardProgress) -> None:
        client.upload_shard(Path(outbox) / shard.name, dataset_id, shard.sha256, shard.received, on_bytes)

    with ThreadPoolExecutor(client.conn.streams) as pool:
        errors = [f.exception() for f in [pool.submit(send, s) for s in pending]]
    failures = [e for e in errors if e is not None]
    for exc in failures:
        if not isinstance(exc, grpc.RpcError):
            raise exc
        if exc.code() not in RESUMABLE:
            raise service_error("upload", exc)
    return failures
