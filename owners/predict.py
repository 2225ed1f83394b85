"""``owner-agent predict``: encrypt images locally with the owner's key, ask the model, print classes.

The images never leave the machine unencrypted; the server learns only the key id.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from owners.cipher import BlockCipher, CipherGeometry
from owners.errors import TaskMismatch
from owners.images import BadImage, load_rgb
from owners.keys import OwnerKey
from owners.upload import Connection, ServerTask, open_channel, service_error
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class PredictionResult:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when the image was refused
    error: str | None = None


def predict_images(key: OwnerKey | None, paths: list[Path], conn: Connection, top: int = 3,
                   allow_weak_geometry: bool = False, log=None) -> list[PredictionResult]:
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
        results: dict[str, PredictionResult] = {}
        good, arrays = [], []
        for path in paths:
            try:
                arrays.append(load_rgb(path, task.image_size)[0])
                good.append(str(path))
            except (BadImage, OSError) as exc:
                results[str(path)] = PredictionResult(str(path), [], str(exc))
        if arrays:
            batch = np.stack(arrays)
            if key is not None:
                batch = BlockCipher(key.secret, CipherGeometry.for_task(task)).encrypt(batch)
            codec = task.codec
            reply = stub.Predict(pb.PredictRequest(images=[codec.encode(img) for img in batch],
                                                   key_id="" if key is None else key.key_id),
                                 metadata=metadata, timeout=conn.call_timeout * 4)
            for path, prediction in zip(good, reply.predictions):
                probs = np.asarray(prediction.probabilities)
                order = np.argsort(-probs)[:top]
                results[path] = PredictionResult(path, [(task.classes[i], float(probs[i])) for i in order])
        return [results[str(p)] for p in paths]
    except grpc.RpcError as exc:
        raise service_error("predict", exc) from None
    finally:
        channel.close()
