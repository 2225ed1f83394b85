"""The prediction service against a hostile caller (an attacker's tests): it checks before it decodes,
accepts only the task's codec, and bounds what one request and many requests at once may cost.
A real gRPC server on 127.0.0.1 in front of a real (untrained) checkpoint."""
from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import mlcore.checkpoint as ckpt
from mlcore.settings import TrainSettings
from models import build_network
from orchestrator import serve
from orchestrator.auth import token_sha256
from orchestrator.config import parse_config
from protocol.codec import Codec
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.task import Task
from tests.badfiles import bomb_png

TASK = Task(("cat", "dog"), image_size=32, block_size=16, scheme="color")
KEY_ID = "00112233aabbccdd"
TOKEN = "predict-token-5e1f"
CALL = 30  # seconds: deadline of every call
RNG = np.random.default_rng(0)


def jpeg() -> bytes:
    return Codec().encode(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def pillow(fmt: str, size: int = 32, flat: bool = False) -> bytes:
    pixels = np.full((size, size, 3), 128, np.uint8) if flat else RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    settings = TrainSettings(strategy="shared-key", model="convmixer_256_8_p4_k9")
    model = build_network(settings.model, 2, TASK.model_input, None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    path = tmp_path_factory.mktemp("ckpt") / ckpt.CHECKPOINT_FILE
    torch.save(ckpt.payload(ckpt.header(TASK, settings, [KEY_ID]), model, optimizer, scheduler, 0, {}), path)
    return path


def start(tmp_path, checkpoint, predictor=None, **serve_limits):
    cfg = parse_config({"name": "predict", "task": {"classes": list(TASK.classes)},
                        "ingest": {"store": str(tmp_path), "insecure_loopback": True,
                                   "owners": [{"id": "hospital-a", "token_sha256": token_sha256(TOKEN)}]},
                        "serve": serve_limits})
    service = serve.start_serving(cfg, checkpoint, lambda owner: {KEY_ID}, listen="127.0.0.1:0")
    if predictor is not None:  # swap in an instrumented predictor behind the real server
        service.servicer.predictor = predictor
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}", options=[("grpc.max_send_message_length", 64 << 20)])
    return SimpleNamespace(service=service, stub=pb_grpc.PredictorStub(channel), channel=channel)


def predict(server, images: list[bytes]):
    return server.stub.Predict(pb.PredictRequest(images=images, key_id=KEY_ID),
                               metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=CALL)


@pytest.fixture
def server(tmp_path, checkpoint):
    s = start(tmp_path, checkpoint)
    yield s
    s.channel.close()
    s.service.stop(0)


def test_an_honest_request_is_answered(server):
    reply = predict(server, [jpeg(), jpeg()])
    assert len(reply.predictions) == 2 and all(len(p.probabilities) == 2 for p in reply.predictions)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "BMP", "GIF", "WEBP"])
def test_only_the_tasks_codec_is_accepted(server, fmt):
    with pytest.raises(grpc.RpcError) as err:
        predict(server, [jpeg(), pillow(fmt)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1" in err.value.details()


def test_a_bomb_and_an_oversized_image_are_refused_before_decoding(server, monkeypatch):
    images = (pillow("JPEG", 4000, flat=True), pillow("JPEG", 64, flat=True), bomb_png(40000, 40000))
    decoded = []
    for cls in (Image.Image, ImageFile.ImageFile):  # JPEG and PNG decode in ImageFile.load
        monkeypatch.setattr(cls, "load", lambda self: decoded.append(self.size))
    for image in images:
        with pytest.raises(grpc.RpcError) as err:
            predict(server, [image])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert decoded == []  # none was decoded: refused from its size in bytes or its header


def test_a_request_over_the_size_limit_is_refused_unread(server):
    with pytest.raises(grpc.RpcError) as err:
        predict(server, [jpeg()] * 10 + [b"\xff" * (serve.MAX_REQUEST_BYTES + 1)])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_many_images_in_one_request_is_refused(tmp_path, checkpoint):
    s = start(tmp_path, checkpoint, max_images_per_request=3)
    try:
        with pytest.raises(grpc.RpcError) as err:
            predict(s, [jpeg()] * 4)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 3" in err.value.details()
    finally:
        s.service.stop(0)


def test_large_images_lower_the_images_per_request():
    big = Task(("cat", "dog"), image_size=1024, block_size=16, scheme="color")
    assert serve.images_per_request(big, serve.ServeConfig()) == serve.MAX_PIXELS_PER_REQUEST // 1024**2


class GatedPredictor:
    """Holds every request until released: requests in flight are then exactly those admitted."""

    def __init__(self, real) -> None:
        self.real, self.entered, self.release = real, threading.Semaphore(0), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def predict(self, encoded, key_id):
        self.entered.release()
        self.release.wait(CALL)
        return self.real.predict(encoded, key_id)


def test_requests_beyond_the_concurrency_limit_are_refused_not_queued(tmp_path, checkpoint):
    s = start(tmp_path, checkpoint, max_concurrent_requests=2)
    gate = GatedPredictor(s.service.servicer.predictor)
    s.service.servicer.predictor = gate
    try:
        held = [s.stub.Predict.future(pb.PredictRequest(images=[jpeg()], key_id=KEY_ID),
                                      metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=CALL)
                for _ in range(2)]
        assert all(gate.entered.acquire(timeout=CALL) for _ in held)  # both admitted and inside
        with pytest.raises(grpc.RpcError) as err:
            predict(s, [jpeg()])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.release.set()
        assert all(len(f.result().predictions) == 1 for f in held)
        assert len(predict(s, [jpeg()]).predictions) == 1  # and the service is fine afterwards
    finally:
        gate.release.set()
        s.service.stop(0)
