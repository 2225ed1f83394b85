"""Prediction on encrypted queries: a trained checkpoint behind a gRPC service.

:class:`Predictor` is plain Python (checkpoint in, probabilities out); :class:`PredictorServicer`
only authenticates, unpacks and packs. Refusals are typed (``orchestrator/errors.py``) and reach
the caller with the status code their type maps to.
"""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from mlcore.checkpoint import load_checkpoint, model_from_checkpoint, task_of
from mlcore.loop import predict_logits
from mlcore.settings import TrainSettings
from orchestrator import rpc
from orchestrator.auth import TokenAuth
from orchestrator.config import ClusterConfig, ConfigError, ServeConfig
from orchestrator.errors import InvalidRequest, ModelNotTrainedForKey, NotYourKey, Refused
from protocol.codec import CodecError, check_encoded
from protocol.net import is_loopback
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.task import PER_IMAGE_KEY_ID

log = logging.getLogger("orchestrator.serve")
MAX_PIXELS_PER_REQUEST = 1 << 24  # 16 M pixels (64 1024x1024 images): bounds a request's decoded memory
MAX_REQUEST_BYTES = 4 << 20  # gRPC's own default, stated: a larger request is refused before it is read


def max_image_bytes(task) -> int:
    """No encoded image of the task is larger: its raw pixels twice over, plus headers. Anything larger
    is refused before Pillow sees it."""
    rows, cols = task.model_input.shape
    return 2 * rows * cols * task.model_input.in_chans + 4096


def images_per_request(task, limits: ServeConfig) -> int:
    """The configured maximum, lowered for large images so a request never decodes more than
    MAX_PIXELS_PER_REQUEST pixels."""
    rows, cols = task.model_input.shape
    return max(1, min(limits.max_images_per_request, MAX_PIXELS_PER_REQUEST // (rows * cols)))


class Predictor:
    def __init__(self, checkpoint: Path, limits: ServeConfig | None = None) -> None:
        data = load_checkpoint(checkpoint)
        self.checkpoint = Path(checkpoint)
        self.model = model_from_checkpoint(data)
        self.task = task_of(data)
        self.classes: list[str] = data["classes"]
        self.key_ids: list[str] = data["key_ids"]
        self.model_name: str = data["model"]
        self.strategy: str = data["strategy"]
        self.settings = TrainSettings.from_dict(data["training"])
        self.max_images = images_per_request(self.task, limits or ServeConfig())
        self.max_image_bytes = max_image_bytes(self.task)

    def predict(self, encoded: list[bytes], key_id: str | None) -> np.ndarray:
        """Probabilities (N, classes) for encoded images encrypted under ``key_id``."""
        if not encoded:
            raise InvalidRequest("no images in the request")
        if len(encoded) > self.max_images:
            raise InvalidRequest(f"at most {self.max_images} images per request, got {len(encoded)}")
        if self.task.encrypted and key_id not in self.key_ids:
            raise ModelNotTrainedForKey(f"this model was not trained on key id {key_id or '(none)'}; it knows "
                                        f"{', '.join(self.key_ids)}: its answers for other keys would be noise")
        batch = self._decode_batch(encoded)
        key_index = torch.full((len(batch),), self.model.key_index(key_id), dtype=torch.long)
        logits = predict_logits(self.model, torch.from_numpy(batch), self.settings, torch.device("cpu"), key_index)
        return torch.softmax(logits, dim=1).numpy()

    def _decode_batch(self, encoded: list[bytes]) -> np.ndarray:
        """Encoded images -> uint8 (N, C, H, W), each checked against the model's input shape."""
        shape = self.task.model_input
        expected = shape.shape + ((3,) if shape.in_chans == 3 else ())
        arrays = []
        for i, data in enumerate(encoded):
            if len(data) > self.max_image_bytes:
                raise InvalidRequest(f"image {i}: {len(data)} bytes; no {self.task.format} image of this task is "
                                     f"larger than {self.max_image_bytes}")
            try:  # format, size and mode from the header before any pixel is decoded
                arr = check_encoded(data, self.task.format, shape.shape, shape.in_chans)
            except CodecError as exc:
                raise InvalidRequest(f"image {i}: {exc}") from None
            if arr.shape != expected:
                raise InvalidRequest(f"image {i}: shape {arr.shape}, the model expects {expected}")
            arrays.append(arr)
        batch = np.stack(arrays)
        return np.ascontiguousarray(batch[:, None] if batch.ndim == 3 else batch.transpose(0, 3, 1, 2))


class PredictorServicer(pb_grpc.PredictorServicer):
    """``owner_key_ids(owner)``: the key ids an owner uploaded under. An owner sees and queries only
    those: another owner's key id is not its to use, and the list of all of them is nobody's business."""

    def __init__(self, predictor: Predictor, run_name: str, auth: TokenAuth, owner_key_ids) -> None:
        self.predictor, self.run_name, self.auth, self.owner_key_ids = predictor, run_name, auth, owner_key_ids

    def GetModelInfo(self, request, context):
        owner = self.auth.owner(context)
        p = self.predictor
        mine = self.owner_key_ids(owner)
        return pb.ModelInfo(task=p.task.to_pb(pb, self.run_name, owner), model=p.model_name, strategy=p.strategy,
                            key_ids=[k for k in p.key_ids if k in mine], owner_id=owner,
                            max_images_per_request=p.max_images, max_request_bytes=MAX_REQUEST_BYTES - (64 << 10))

    def Predict(self, request, context):
        owner = self.auth.owner(context)
        try:
            key_id = request.key_id or None
            if self.predictor.task.per_image_keys:  # each image under its own key: no key id to check or route by
                key_id = PER_IMAGE_KEY_ID
            elif self.predictor.task.encrypted and key_id not in self.owner_key_ids(owner):
                raise NotYourKey(f"key id {key_id or '(none)'} is not one you uploaded under")
            probs = self.predictor.predict(list(request.images), key_id)
        except Refused as exc:
            rpc.abort(context, exc)
        log.info("owner %s: %d predictions", owner, len(probs))
        return pb.PredictReply(predictions=[pb.Prediction(probabilities=row.tolist(), label=int(row.argmax()))
                                            for row in probs])


@dataclass
class PredictionService:
    server: grpc.Server
    port: int
    servicer: PredictorServicer

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()


def start_serving(cfg: ClusterConfig, checkpoint: Path, owner_key_ids, listen: str | None = None) -> PredictionService:
    listen = listen or cfg.serve.listen
    if cfg.ingest.tls is None and not (cfg.ingest.insecure_loopback and is_loopback(listen)):
        raise ConfigError("serve.listen: refusing to accept tokens without TLS off loopback")
    predictor = Predictor(checkpoint, cfg.serve)
    # gRPC refuses (RESOURCE_EXHAUSTED) a request over the limit before reading it, and any request beyond
    # max_concurrent_requests at once: memory is bounded by limits x the largest batch.
    concurrent = cfg.serve.max_concurrent_requests
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=concurrent), maximum_concurrent_rpcs=concurrent,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    servicer = PredictorServicer(predictor, cfg.name, TokenAuth({o.id: o.token_sha256 for o in cfg.ingest.owners}),
                                 owner_key_ids)
    pb_grpc.add_PredictorServicer_to_server(servicer, server)
    port = rpc.bind(server, listen, cfg.ingest.tls, "serve.listen")
    server.start()
    log.info("prediction service on %s:%d (model %s, checkpoint %s)", listen.rpartition(":")[0], port,
             predictor.model_name, checkpoint)
    return PredictionService(server, port, servicer)
