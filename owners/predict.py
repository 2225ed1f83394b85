"""``owner-agent predict``: encrypt images locally with the owner's key and classify them.

Two places a model can be: the cloud's prediction service (the images leave the machine only
encrypted; the server learns only the key id), or, for a federated model, this machine (the
federation's final trunk next to the owner's own adapter: nothing leaves at all).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from owners.cipher import BlockCipher, CipherGeometry
from owners.encrypt import encrypt_per_image, key_for_task, upload_key_id
from owners.errors import OutboxError
from owners.images import ALLOWED_SUFFIXES, BadImage, load_rgb
from owners.keys import OwnerKey
from owners.upload import Connection, ServerTask, open_channel, service_error
from protocol.codec import decode
from protocol.net import MAX_MESSAGE_BYTES
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.shards import atomic_write
from protocol.task import Task

PATHS_PER_STEP = 256  # images loaded and encrypted at once: bounds this machine's memory for any number of files
DEFAULT_MAX_IMAGES = 256  # a server that states no limit (older versions) took at most this many per call
SEND_SLACK = 16 << 10  # bytes left for the request's own framing and key id


@dataclass(frozen=True)
class PredictionResult:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when the image was refused
    error: str | None = None


def image_paths(inputs: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for images (by suffix, sorted, hidden ones
    skipped). A path that does not exist stays in the list: its result is the error naming it, and
    the other files are still answered."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in ALLOWED_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            paths.append(item)
    return paths


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
    if task.per_image_keys:  # each query image under its own fresh key, like an upload of such a task
        batch = encrypt_per_image(batch, CipherGeometry.for_task(task))
    elif key is not None:
        batch = BlockCipher(key.secret, CipherGeometry.for_task(task)).encrypt(batch)
    return good, [task.codec.encode(img) for img in batch], refused


def _ranked(path: str, probs: np.ndarray, classes: tuple[str, ...], top: int) -> PredictionResult:
    order = np.argsort(-probs)[:top]
    return PredictionResult(path, [(classes[i], float(probs[i])) for i in order])


def request_batches(encoded: list[bytes], max_images: int, max_bytes: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive requests of at most ``max_images`` images and ``max_bytes`` bytes
    (an image larger than that alone goes alone: the server then says what is wrong with it)."""
    batches, start, size = [], 0, 0
    for i, data in enumerate(encoded):
        if i > start and (i - start == max_images or size + len(data) > max_bytes):
            batches.append((start, i))
            start, size = i, 0
        size += len(data)
    if start < len(encoded):
        batches.append((start, len(encoded)))
    return batches


class _Service:
    """The prediction service, as the limits it states: one Predict call per batch that fits them."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.channel = conn, open_channel(conn)
        self.stub = pb_grpc.PredictorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {conn.token}"),)
        self.info = self.stub.GetModelInfo(pb.ModelInfoRequest(), metadata=self.metadata, timeout=conn.call_timeout)
        self.max_images = self.info.max_images_per_request or DEFAULT_MAX_IMAGES
        self.max_bytes = min(self.info.max_request_bytes or MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES) - SEND_SLACK

    def predict(self, encoded: list[bytes], key_id: str) -> list[np.ndarray]:
        probabilities = []
        for start, end in request_batches(encoded, self.max_images, self.max_bytes):
            reply = self.stub.Predict(pb.PredictRequest(images=encoded[start:end], key_id=key_id),
                                      metadata=self.metadata, timeout=self.conn.call_timeout * 4)
            probabilities += [np.asarray(p.probabilities) for p in reply.predictions]
        return probabilities


def predict_images(key: OwnerKey | None, inputs: list[Path], conn: Connection, top: int = 3,
                   accept_cloud_can_decrypt: bool = False, log=None,
                   progress: bool | None = None, plain_ok: bool = True) -> list[PredictionResult]:
    """Ask the cloud's prediction service about any number of files and folders, in batches within
    the limits the service states; one result per image, in order. A refusal of the whole request
    (wrong key id, wrong token) is raised once, as a ServiceError.

    A query image encrypted under the owner's key is evidence about that key like an upload: the task's
    privacy verdict is shown first and ``broken`` refused (CloudCanDecrypt, no image sent) unless
    ``accept_cloud_can_decrypt``."""
    paths = image_paths(inputs)
    try:
        service = _Service(conn)
    except grpc.RpcError as exc:
        raise service_error("predict", exc) from None
    try:
        task = _checked_task(service.info, key, accept_cloud_can_decrypt, log)
        key = key_for_task(task, key, plain_ok, "the model's task", log or (lambda msg: print(msg, file=sys.stderr)))
        results: dict[str, PredictionResult] = {}
        with tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr, disable=progress is False) as bar:
            for step in range(0, len(paths), PATHS_PER_STEP):
                good, encoded, refused = _encrypted(key, paths[step:step + PATHS_PER_STEP], task)
                results.update(refused)
                probabilities = service.predict(encoded, upload_key_id(task, key) or "") if encoded else []
                results.update({path: _ranked(path, p, task.classes, top) for path, p in zip(good, probabilities)})
                bar.update(len(good) + len(refused))
        return [results[str(p)] for p in paths]
    except grpc.RpcError as exc:
        raise service_error("predict", exc) from None
    finally:
        service.channel.close()


def _checked_task(info: pb.ModelInfo, key: OwnerKey | None, accept_cloud_can_decrypt: bool, log) -> Task:
    offer = ServerTask.from_pb(info.task)
    task = offer.task
    offer.checked_privacy(accept_cloud_can_decrypt, log or (lambda msg: print(msg, file=sys.stderr)))
    return task


def predict_federated(key: OwnerKey, inputs: list[Path], state_dir: Path, top: int = 3,
                      progress: bool | None = None) -> list[PredictionResult]:
    """Predict on this machine with a federated model: the final trunk the federation handed out
    (``<state-dir>/trunk.pt``) behind this owner's own adapter (``adapter-<key id>.pt``)."""
    import torch

    from mlcore.checkpoint import task_of
    from mlcore.federated import owner_model

    trunk_file, adapter_file = Path(state_dir) / "trunk.pt", Path(state_dir) / f"adapter-{key.key_id}.pt"
    for path, what in ((trunk_file, "the federation's final trunk"), (adapter_file, f"an adapter for key {key.name}")):
        if not path.is_file():
            raise OutboxError(f"{path} not found: {state_dir} holds no {what} (the folder `owner-agent federate` "
                              "named when it joined; the trunk arrives when the federation finishes)")
    paths = image_paths(inputs)
    trunk = torch.load(trunk_file, map_location="cpu", weights_only=True)  # tensors and plain values only
    model = owner_model(trunk, torch.load(adapter_file, map_location="cpu", weights_only=True))
    task = task_of(trunk)
    results: dict[str, PredictionResult] = {}
    with tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr, disable=progress is False) as bar:
        for step in range(0, len(paths), PATHS_PER_STEP):
            good, encoded, refused = _encrypted(key, paths[step:step + PATHS_PER_STEP], task)
            results.update(refused)
            if encoded:
                probabilities = _local_probabilities(model, encoded, trunk["training"])
                results.update({path: _ranked(path, p, task.classes, top) for path, p in zip(good, probabilities)})
            bar.update(len(good) + len(refused))
    return [results[str(p)] for p in paths]


def write_results(results: list[PredictionResult], path: Path) -> None:
    """``.json``: a list of {path, top: [[class, p], ...], error}; ``.csv``: path, rank, class,
    probability, error (one row per ranked class, one row per refused image)."""
    if path.suffix.lower() == ".json":
        atomic_write(path, json.dumps([dataclasses.asdict(r) for r in results], indent=1).encode("utf-8"))
    elif path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "rank", "class", "probability", "error"])
        for r in results:
            rows = [[r.path, rank, name, f"{p:.6f}", ""] for rank, (name, p) in enumerate(r.top, 1)]
            writer.writerows(rows or [[r.path, "", "", "", r.error or ""]])
        atomic_write(path, buffer.getvalue().encode("utf-8"))
    else:
        raise OutboxError(f"--output {path}: give a .csv or .json file name")


def _local_probabilities(model, encoded: list[bytes], training: dict) -> np.ndarray:
    import torch

    from mlcore.loop import predict_logits
    from mlcore.settings import TrainSettings

    images = np.stack([decode(data) for data in encoded])  # as the model saw them in training
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    logits = predict_logits(model, torch.from_numpy(np.ascontiguousarray(images)), TrainSettings.from_dict(training),
                            torch.device("cpu"))
    return torch.softmax(logits, dim=1).numpy()
