"""``owner-agent predict``: encrypt images locally with the owner's key and classify them.

Two places a model can be: the cloud's prediction service (the images leave the machine only
encrypted; the server learns only the key id), or, for a federated model, this machine (the
federation's final trunk next to the owner's own adapter: nothing leaves at all).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from owners.cipher import BlockCipher, CipherGeometry
from owners.errors import OutboxError, TaskMismatch
from owners.images import BadImage, load_rgb
from owners.keys import OwnerKey
from owners.upload import Connection, ServerTask, open_channel, service_error
from protocol.codec import decode
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.task import Task


@dataclass(frozen=True)
class PredictionResult:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when the image was refused
    error: str | None = None


def _encrypted(key: OwnerKey | None, paths: list[Path], task: Task) -> tuple[list[str], list[bytes], dict]:
    """The usable images, encrypted and encoded exactly as an upload stores them; refusals by path."""
    refused: dict[str, PredictionResult] = {}
    good, arrays = [], []
    for path in paths:
        try:
            arrays.append(load_rgb(path, task.image_size)[0])
            good.append(str(path))
        except (BadImage, OSError) as exc:
            refused[str(path)] = PredictionResult(str(path), [], str(exc))
    if not arrays:
        return good, [], refused
    batch = np.stack(arrays)
    if key is not None:
        batch = BlockCipher(key.secret, CipherGeometry.for_task(task)).encrypt(batch)
    return good, [task.codec.encode(img) for img in batch], refused


def _ranked(path: str, probs: np.ndarray, classes: tuple[str, ...], top: int) -> PredictionResult:
    order = np.argsort(-probs)[:top]
    return PredictionResult(path, [(classes[i], float(probs[i])) for i in order])


def predict_images(key: OwnerKey | None, paths: list[Path], conn: Connection, top: int = 3,
                   allow_weak_geometry: bool = False, log=None) -> list[PredictionResult]:
    """Ask the cloud's prediction service."""
    channel = open_channel(conn)
    stub = pb_grpc.PredictorStub(channel)
    metadata = (("authorization", f"Bearer {conn.token}"),)
    try:
        info = stub.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=conn.call_timeout)
        offer = ServerTask.from_pb(info.task)
        task = offer.task
        if task.encrypted != (key is not None):
            raise TaskMismatch(f"the model's task uses scheme {task.scheme!r}: "
                               + ("a --key is required" if task.encrypted else "use --plain"))
        offer.checked_geometry(allow_weak_geometry, log or (lambda msg: print(msg, file=sys.stderr)))
        good, encoded, results = _encrypted(key, paths, task)
        if encoded:
            reply = stub.Predict(pb.PredictRequest(images=encoded, key_id="" if key is None else key.key_id),
                                 metadata=metadata, timeout=conn.call_timeout * 4)
            for path, prediction in zip(good, reply.predictions):
                results[path] = _ranked(path, np.asarray(prediction.probabilities), task.classes, top)
        return [results[str(p)] for p in paths]
    except grpc.RpcError as exc:
        raise service_error("predict", exc) from None
    finally:
        channel.close()


def predict_federated(key: OwnerKey, paths: list[Path], state_dir: Path, top: int = 3) -> list[PredictionResult]:
    """Predict on this machine with a federated model: the final trunk the federation handed out
    (``<state-dir>/trunk.pt``) behind this owner's own adapter (``adapter-<key id>.pt``)."""
    import torch

    from mlcore.checkpoint import task_of
    from mlcore.federated import owner_model
    from mlcore.loop import predict_logits
    from mlcore.settings import TrainSettings

    trunk_file, adapter_file = Path(state_dir) / "trunk.pt", Path(state_dir) / f"adapter-{key.key_id}.pt"
    for path, what in ((trunk_file, "the federation's final trunk"), (adapter_file, f"an adapter for key {key.name}")):
        if not path.is_file():
            raise OutboxError(f"{path} not found: {state_dir} holds no {what} (the folder `owner-agent federate` "
                              "named when it joined; the trunk arrives when the federation finishes)")
    trunk = torch.load(trunk_file, map_location="cpu", weights_only=True)  # tensors and plain values only
    model = owner_model(trunk, torch.load(adapter_file, map_location="cpu", weights_only=True))
    task = task_of(trunk)
    good, encoded, results = _encrypted(key, paths, task)
    if encoded:
        images = np.stack([decode(data) for data in encoded])  # as the model saw them in training
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        logits = predict_logits(model, torch.from_numpy(np.ascontiguousarray(images)),
                                TrainSettings.from_dict(trunk["training"]), torch.device("cpu"))
        for path, probs in zip(good, torch.softmax(logits, dim=1).numpy()):
            results[path] = _ranked(path, probs, task.classes, top)
    return [results[str(p)] for p in paths]
