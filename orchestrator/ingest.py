"""The ingest service: gRPC in front of :class:`ShardStore`. Thin: authenticate, unpack, call, pack.

Authentication: every call carries ``authorization: Bearer <token>`` metadata; the server knows
only sha256(token) per owner (from the config) and the token alone decides the owner id.

Resource limits (``ingest:`` in the config), so that one owner or one stalled client cannot block
ingest for everyone: per-owner upload streams and an idle timeout per stream
(``orchestrator/limits.py``), a newer stream of a shard taking over from a stalled one, a per-owner
byte quota and the expiry of abandoned partial uploads (``orchestrator/store.py``), and on the
gRPC server a connection limit, a handshake timeout, idle-connection closing, keepalive, and as many
worker threads as those limits can keep busy (``server_options``, ``worker_count``).
"""
from __future__ import annotations

import logging
import resource
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from orchestrator import rpc
from orchestrator.auth import TokenAuth
from orchestrator.config import ClusterConfig, ConfigError
from orchestrator.errors import Refused
from orchestrator.keypolicy import KeyPolicy
from orchestrator.limits import Periodic, Stream, StreamLimits
from orchestrator.store import DatasetState, ShardProgress, ShardStore
from protocol.net import MAX_MESSAGE_BYTES, is_loopback
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc

log = logging.getLogger("orchestrator.ingest")

SHORT_CALL_THREADS = 32  # worker threads beyond the upload streams: GetTask, OpenDataset, CommitDataset
KEEPALIVE_TIME_MS = 60_000  # ping a connection with calls open after a minute of silence ...
KEEPALIVE_TIMEOUT_MS = 20_000  # ... and drop it if no answer comes in 20 s (a peer gone without a FIN)

def _progress_pb(p: ShardProgress) -> pb.ShardProgress:
    return pb.ShardProgress(name=p.name, sha256=p.sha256, size=p.size, received=p.received, stored=p.stored)


def _state_pb(s: DatasetState) -> pb.DatasetState:
    return pb.DatasetState(dataset_id=s.dataset_id, owner_id=s.owner, split=s.split, key_id=s.key_id or "",
                           shards=[_progress_pb(p) for p in s.shards], committed=s.committed, images=s.images)


class IngestServicer(pb_grpc.IngestServicer):
    def __init__(self, store: ShardStore, run_name: str, owner_token_hashes: dict[str, str],
                 limits: StreamLimits) -> None:
        self.store = store
        self.run_name = run_name
        self.limits = limits
        self._auth = TokenAuth(owner_token_hashes)

    def _owner(self, context: grpc.ServicerContext) -> str:
        return self._auth.owner(context)

    def _refuse(self, context: grpc.ServicerContext, owner: str, exc: Refused) -> None:
        log.info("refused %s: %s", owner, exc)
        rpc.abort(context, exc)

    def GetTask(self, request, context):
        owner = self._owner(context)
        return self.store.task.to_pb(pb, self.run_name, owner)

    def OpenDataset(self, request, context):
        owner = self._owner(context)
        try:
            self.store.check_room_for(owner, request.manifest_json)
            state = self.store.open_dataset(owner, request.manifest_json, request.new_key_domain)
        except Refused as exc:
            self._refuse(context, owner, exc)
        log.info("owner %s opened dataset %s (%s, key %s, %d images, %d shards)", owner, state.dataset_id[:12],
                 state.split, state.key_id, state.images, len(state.shards))
        return _state_pb(state)

    def UploadShard(self, request_iterator, context):
        owner = self._owner(context)
        try:
            stream = self.limits.open(owner, context.cancel)  # before waiting for any message
        except Refused as exc:
            self._refuse(context, owner, exc)
        with stream:
            return self._upload(owner, stream, request_iterator, context)

    def _upload(self, owner: str, stream: Stream, request_iterator, context) -> pb.ShardState:
        """One shard's stream, inside its slot. Ended from outside (idle, superseded), the read raises
        grpc.RpcError; the ``finally`` frees the shard on every way out."""
        messages = stream.messages(request_iterator)
        first = next(messages, None)
        if first is None or not first.HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the shard header")
        h = first.header
        stream.what = f"upload of shard {h.shard_sha256[:12]}..."
        try:
            upload = self.store.begin_upload(owner, h.dataset_id, h.shard_sha256, h.offset, stop=stream.supersede)
        except Refused as exc:
            self._refuse(context, owner, exc)
        try:
            for message in _chain(first, messages):
                if message.data:
                    upload.write(message.data, message.data_crc32)
            progress = upload.finish()
        except Refused as exc:
            self._refuse(context, owner, exc)
        finally:
            upload.abort()  # idempotent: frees the shard however the stream ended (refused, client gone)
        if progress.stored:
            log.info("owner %s stored shard %s (%d bytes)", owner, h.shard_sha256[:12], progress.size)
        return pb.ShardState(progress=_progress_pb(progress))

    def CommitDataset(self, request, context):
        owner = self._owner(context)
        try:
            state = self.store.commit_dataset(owner, request.dataset_id)
        except Refused as exc:
            self._refuse(context, owner, exc)
        log.info("owner %s committed dataset %s (%s, %d images)", owner, state.dataset_id[:12], state.split,
                 state.images)
        return _state_pb(state)


def _chain(first, rest):
    yield first
    yield from rest


@dataclass
class IngestService:
    server: grpc.Server
    port: int  # the bound port (useful with port 0)
    store: ShardStore
    log_handler: logging.Handler
    limits: StreamLimits
    sweeper: Periodic  # expires abandoned partial uploads

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()
        self.sweeper.close()
        self.limits.close()
        self.store.close()
        log.removeHandler(self.log_handler)
        self.log_handler.close()


def worker_count(ing) -> int:
    """Threads serving calls: one per upload stream the owners may hold at once, plus some for short
    calls, unless the config names a number. The limits, not the pool, decide who waits."""
    return ing.workers or len(ing.owners) * ing.max_streams_per_owner + SHORT_CALL_THREADS


def server_options(ing) -> list[tuple[str, int]]:
    """gRPC C-core channel arguments of the ingest server (names as in grpc_types.h / the installed grpc)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_allowed_incoming_connections", ing.max_connections),  # beyond: new connections closed
        ("grpc.server_handshake_timeout_ms", round(ing.handshake_timeout_s * 1000)),  # silent sockets go
        ("grpc.max_connection_idle_ms", round(ing.connection_idle_s * 1000)),  # connections with no call go
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ]


def raise_open_file_limit() -> int:
    """Every connection holds a file descriptor: raise the soft limit (often 1024) to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # an unlimited hard limit may exceed the kernel's nr_open
            log.warning("could not raise the open-file limit from %d to %s: %s", soft, hard, exc)
    return soft


def start_ingest(cfg: ClusterConfig, listen: str | None = None) -> IngestService:
    """Start the ingest server (non-blocking); ``listen`` overrides the config's address."""
    ing = cfg.ingest
    listen = listen or ing.listen
    if not ing.owners:
        raise ConfigError("ingest.owners: no owner may upload; add at least one {id, token_sha256}")
    if ing.tls is None and not (ing.insecure_loopback and is_loopback(listen)):
        raise ConfigError("ingest.tls: refusing to accept tokens without TLS off loopback")
    open_files = raise_open_file_limit()
    store = ShardStore(Path(ing.store) / cfg.name, cfg.task, ing.max_shard_bytes, KeyPolicy.from_config(cfg),
                       owner_quota_bytes=ing.owner_quota_bytes, partial_expiry_s=ing.partial_expiry_s)
    handler = _log_to_store(store.root)
    sweep = _sweep(store)
    sweep()  # what an earlier run left behind, before anyone may upload
    workers = worker_count(ing)
    # RPCs beyond the pool are refused at once (RESOURCE_EXHAUSTED), never queued behind silent ones
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=server_options(ing),
                         maximum_concurrent_rpcs=workers)
    limits = StreamLimits(ing.max_streams_per_owner, ing.stream_idle_timeout_s)
    pb_grpc.add_IngestServicer_to_server(
        IngestServicer(store, cfg.name, {o.id: o.token_sha256 for o in ing.owners}, limits), server)
    try:
        port = rpc.bind(server, listen, ing.tls, "ingest.listen")
    except OSError as exc:
        limits.close()
        raise ConfigError(str(exc)) from None
    server.start()
    sweeper = Periodic("ingest-partial-sweeper", min(3600.0, ing.partial_expiry_s / 4), sweep)
    log.info("ingest for run %s listening on %s (%s), store %s; %d workers, %d open files, limits: %s", cfg.name,
             listen.rpartition(":")[0] + f":{port}", "TLS" if ing.tls else "plaintext, loopback only", store.root,
             workers, open_files, _describe_limits(ing))
    if ing.max_connections > open_files - workers - 64:
        log.warning("ingest.max_connections (%d) is near the open-file limit (%d): raise the hard limit "
                    "(ulimit -Hn) or lower max_connections", ing.max_connections, open_files)
    return IngestService(server, port, store, handler, limits, sweeper)


def _sweep(store: ShardStore):
    def sweep() -> None:
        for path in store.expire_partials():
            log.info("expired partial upload %s (untouched for %g s)", path.relative_to(store.root),
                     store.partial_expiry_s)
    return sweep


def _describe_limits(ing) -> str:
    return (f"{ing.max_streams_per_owner} streams per owner, idle after {ing.stream_idle_timeout_s:g} s, "
            f"{ing.max_connections} connections, handshake {ing.handshake_timeout_s:g} s, quota "
            f"{ing.owner_quota_bytes:,} bytes per owner, partial uploads expire after {ing.partial_expiry_s:g} s")


def _log_to_store(root: Path) -> logging.Handler:
    """Log to STORE/logs/ingest.log as well: the store keeps its own history."""
    (root / "logs").mkdir(exist_ok=True)
    handler = logging.FileHandler(root / "logs" / "ingest.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
