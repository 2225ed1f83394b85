"""The ingest service: gRPC in front of :class:`ShardStore`. Thin: authenticate, unpack, call, pack.

Authentication: every call carries ``authorization: Bearer <token>`` metadata; the server knows
only sha256(token) per owner (from the config) and the token alone decides the owner id.
"""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from orchestrator import rpc
from orchestrator.auth import TokenAuth
from orchestrator.config import ClusterConfig, ConfigError
from orchestrator.errors import Refused
from orchestrator.keypolicy import KeyPolicy
from orchestrator.store import DatasetState, ShardProgress, ShardStore
from protocol.net import MAX_MESSAGE_BYTES, is_loopback
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc

log = logging.getLogger("orchestrator.ingest")



def _progress_pb(p: ShardProgress) -> pb.ShardProgress:
    return pb.ShardProgress(name=p.name, sha256=p.sha256, size=p.size, received=p.received, stored=p.stored)


def _state_pb(s: DatasetState) -> pb.DatasetState:
    return pb.DatasetState(dataset_id=s.dataset_id, owner_id=s.owner, split=s.split, key_id=s.key_id or "",
                           shards=[_progress_pb(p) for p in s.shards], committed=s.committed, images=s.images)


class IngestServicer(pb_grpc.IngestServicer):
    def __init__(self, store: ShardStore, run_name: str, owner_token_hashes: dict[str, str]) -> None:
        self.store = store
        self.run_name = run_name
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
            state = self.store.open_dataset(owner, request.manifest_json, request.new_key_domain)
        except Refused as exc:
            self._refuse(context, owner, exc)
        log.info("owner %s opened dataset %s (%s, key %s, %d images, %d shards)", owner, state.dataset_id[:12],
                 state.split, state.key_id, state.images, len(state.shards))
        return _state_pb(state)

    def UploadShard(self, request_iterator, context):
        owner = self._owner(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the shard header")
        h = first.header
        try:
            upload = self.store.begin_upload(owner, h.dataset_id, h.shard_sha256, h.offset)
        except Refused as exc:
            self._refuse(context, owner, exc)
        try:
            for message in _chain(first, request_iterator):
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

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()
        self.store.close()
        log.removeHandler(self.log_handler)
        self.log_handler.close()


def start_ingest(cfg: ClusterConfig, listen: str | None = None, workers: int = 8) -> IngestService:
    """Start the ingest server (non-blocking); ``listen`` overrides the config's address."""
    ing = cfg.ingest
    listen = listen or ing.listen
    if not ing.owners:
        raise ConfigError("ingest.owners: no owner may upload; add at least one {id, token_sha256}")
    if ing.tls is None and not (ing.insecure_loopback and is_loopback(listen)):
        raise ConfigError("ingest.tls: refusing to accept tokens without TLS off loopback")
    store = ShardStore(Path(ing.store) / cfg.name, cfg.task, ing.max_shard_bytes, KeyPolicy.from_config(cfg))
    handler = _log_to_store(store.root)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    pb_grpc.add_IngestServicer_to_server(
        IngestServicer(store, cfg.name, {o.id: o.token_sha256 for o in ing.owners}), server)
    try:
        port = rpc.bind(server, listen, ing.tls, "ingest.listen")
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    server.start()
    log.info("ingest for run %s listening on %s (%s), store %s", cfg.name, listen.rpartition(":")[0] + f":{port}",
             "TLS" if ing.tls else "plaintext, loopback only", store.root)
    return IngestService(server, port, store, handler)


def _log_to_store(root: Path) -> logging.Handler:
    """Log to STORE/logs/ingest.log as well: the store keeps its own history."""
    (root / "logs").mkdir(exist_ok=True)
    handler = logging.FileHandler(root / "logs" / "ingest.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
