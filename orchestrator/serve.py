"""Prediction on encrypted queries: a trained checkpoint behind a gRPC service.

:class:`Predictor` is plain Python (checkpoint in, probabilities out); :class:`PredictorServicer`
only authenticates, unpacks and packs.
"""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from models.keyed import KeyedModel
from orchestrator.auth import TokenAuth, bind
from orchestrator.config import ClusterConfig, ConfigError, TrainingConfig, is_loopback
from orchestrator.data import Geometry
from orchestrator.proto import ingest_pb2 as pb
from orchestrator.proto import ingest_pb2_grpc as pb_grpc
from orchestrator.training import load_checkpoint, model_from_checkpoint, predict_logits
from owners.shards import decode  # the shared file format; no key material

log = logging.getLogger("orchestrator.serve")
MAX_IMAGES_PER_REQUEST = 256


class QueryError(ValueError):
    pass


class Predictor:
    def __init__(self, checkpoint: Path) -> None:
        payload = load_checkpoint(checkpoint)
        self.checkpoint = Path(checkpoint)
        self.model = model_from_checkpoint(payload)
        self.classes: list[str] = payload["classes"]
        self.geometry = Geometry(**payload["geometry"])
        self.key_ids: list[str] = payload["key_ids"]
        self.model_name: str = payload["model"]
        self.strategy: str = payload["strategy"]
        self.settings = TrainingConfig(precision=payload["training"]["precision"])

    def predict(self, encoded: list[bytes], key_id: str | None) -> np.ndarray:
        """Probabilities (N, classes) for encoded images encrypted under ``key_id``."""
        if not encoded:
            raise QueryError("no images in the request")
        if len(encoded) > MAX_IMAGES_PER_REQUEST:
            raise QueryError(f"at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(encoded)}")
        if self.geometry.scheme != "plain" and key_id not in self.key_ids:
            raise QueryError(f"this model was not trained on key id {key_id or '(none)'}; it knows "
                             f"{', '.join(self.key_ids)}: its answers for other keys would be noise")
        expected = self.geometry.shape + ((3,) if self.geometry.in_chans == 3 else ())
        arrays = []
        for i, data in enumerate(encoded):
            try:
                arr = decode(data)
            except Exception as exc:  # noqa: BLE001 - any undecodable input is the caller's error
                raise QueryError(f"image {i}: cannot decode ({type(exc).__name__})") from None
            if arr.shape != expected:
                raise QueryError(f"image {i}: shape {arr.shape}, the model expects {expected}")
            arrays.append(arr)
        batch = np.stack(arrays)
        batch = batch[:, None] if batch.ndim == 3 else batch.transpose(0, 3, 1, 2)
        key_index = None
        if isinstance(self.model, KeyedModel):  # route every image through its key's adapter
            key_index = torch.full((len(batch),), self.model.key_index(key_id), dtype=torch.long)
        logits = predict_logits(self.model, torch.from_numpy(np.ascontiguousarray(batch)), self.settings,
                                torch.device("cpu"), key_index)
        return torch.softmax(logits, dim=1).numpy()


class PredictorServicer(pb_grpc.PredictorServicer):
    def __init__(self, predictor: Predictor, task: pb.Task, auth: TokenAuth) -> None:
        self.predictor, self.task, self.auth = predictor, task, auth

    def GetModelInfo(self, request, context):
        owner = self.auth.owner(context)
        task = pb.Task()
        task.CopyFrom(self.task)
        task.owner_id = owner
        p = self.predictor
        return pb.ModelInfo(task=task, model=p.model_name, strategy=p.strategy, key_ids=p.key_ids, owner_id=owner)

    def Predict(self, request, context):
        owner = self.auth.owner(context)
        try:
            probs = self.predictor.predict(list(request.images), request.key_id or None)
        except QueryError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT if "not trained" not in str(exc)
                          else grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("owner %s: %d predictions", owner, len(probs))
        return pb.PredictReply(predictions=[pb.Prediction(probabilities=row.tolist(), label=int(row.argmax()))
                                            for row in probs])


@dataclass
class PredictionService:
    server: grpc.Server
    port: int

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()


def start_serving(cfg: ClusterConfig, checkpoint: Path, listen: str | None = None) -> PredictionService:
    listen = listen or cfg.serve.listen
    if cfg.ingest.tls is None and not (cfg.ingest.insecure_loopback and is_loopback(listen)):
        raise ConfigError("serve.listen: refusing to accept tokens without TLS off loopback")
    predictor = Predictor(checkpoint)
    t = cfg.task
    task = pb.Task(run_name=cfg.name, classes=list(t.classes), image_size=t.image_size, block_size=t.block_size,
                   scheme=t.scheme, format=t.format, quality=t.quality, chroma=t.chroma)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_PredictorServicer_to_server(
        PredictorServicer(predictor, task, TokenAuth({o.id: o.token_sha256 for o in cfg.ingest.owners})), server)
    port = bind(server, listen, cfg.ingest.tls, "serve.listen")
    server.start()
    log.info("prediction service on %s:%d (model %s, checkpoint %s)", listen.rpartition(":")[0], port,
             predictor.model_name, checkpoint)
    return PredictionService(server, port)
