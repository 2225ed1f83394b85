"""orchestrator launch end to end, and Ray Train surviving a killed worker. Real Ray, real gRPC."""
import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from mlcore.checkpoint import load_checkpoint
from mlcore.data import outbox_refs
from orchestrator.auth import token_sha256
from orchestrator.config import TrainingConfig, parse_config
from orchestrator.training import TrainJob, run_training
from owners.agent import run_agent
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from owners.predict import predict_images
from owners.upload import Connection, ServiceError
from protocol.net import free_port
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.task import Task

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOKENS = {"hospital-a": "launch-token-a", "hospital-b": "launch-token-b"}
SHARED = OwnerKey("shared", bytes(range(32)))
PRIVATE = OwnerKey("private", bytes(range(100, 132)))
WAIT = 600  # seconds: upper bound of any wait below


def owner_folders(root: Path, per_class: int) -> dict[str, Path]:
    """Each owner: a slice of the sample's train images per class, and half the test images."""
    folders = {}
    for i, owner in enumerate(TOKENS):
        for split, count in (("train", per_class), ("test", 10)):
            for cls in CLASSES:
                target = root / owner / split / cls
                target.mkdir(parents=True)
                files = sorted((SAMPLE / split / cls).iterdir())[i * count:(i + 1) * count]
                for f in files:
                    (target / f.name).symlink_to(f)
        folders[owner] = root / owner
    return folders


def wait_until(condition, what: str, timeout: float = WAIT, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return value


@contextlib.contextmanager
def launch_in_background(cfg):
    """``launch(cfg, once=False)`` in a thread: yields (log messages, outcome dict with "report" or
    "error"); on leaving, stops it, waits, and fails the test if launch raised."""
    from orchestrator.launch import launch

    messages: list[str] = []
    stop, outcome = threading.Event(), {}

    def run():
        try:
            outcome["report"] = launch(cfg, once=False, stop=stop, log=messages.append)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: any(m.startswith("ingest service on port") for m in messages) or "error" in outcome,
                   "ingest")
        assert "error" not in outcome, outcome.get("error")
        yield messages, outcome
    finally:
        stop.set()
        thread.join(120)
    assert "error" not in outcome, outcome.get("error")


def check_status(tmp_path, doc, capsys, report, report_path) -> None:
    """`orchestrator status` (a separate reader of the store) shows the owners, datasets and the run."""
    from orchestrator.cli import main as orchestrator

    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert orchestrator(["status", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    owners = {o["owner"]: o for o in status["owners"]}
    assert set(owners) == set(TOKENS) and all(o["in_config"] and o["train_images"] > 0 for o in owners.values())
    assert sorted(owners["hospital-b"]["key_ids"]) == sorted([SHARED.key_id, PRIVATE.key_id])
    assert len(status["datasets"]) == 5 and status["waiting_for"] == []
    (run,) = status["runs"]
    assert run["state"] == "finished" and run["report"] == str(report_path) and run["epoch"] == 2
    assert run["test_acc"] == pytest.approx(report["seen_key_accuracy"])
    assert orchestrator(["status", str(config)]) == 0  # the table for people names the same run
    assert run["run"] in capsys.readouterr().out


def check_ray_metrics(run_name: str) -> None:
    """The same figures reach Ray's metrics endpoint (what the dashboard's Metrics view reads)."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])

    def samples() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("ray_etc_")}

    def epochs(now: dict[str, float]) -> list[float]:
        return [v for k, v in now.items() if k.startswith("ray_etc_training_epoch{") and f'run="{run_name}"' in k]

    # published every few seconds, exported by Ray's agent on its own period: wait for the final epoch
    def final_epoch_published() -> dict[str, float] | None:
        now = samples()
        return now if epochs(now) == [2.0] else None

    now = wait_until(final_epoch_published, "the final epoch on Ray's metrics", poll=1.0)
    stored = [v for k, v in now.items() if k.startswith("ray_etc_images_stored{") and 'owner="hospital-a"' in k
              and 'split="train"' in k]
    assert stored and stored[0] > 0


def test_launch_trains_on_two_owners_reports_and_serves(tmp_path, monkeypatch, capsys):
    ingest_port, serve_port, dash_port = free_port(), free_port(), free_port()
    cfg = parse_config(doc := {
        "name": "launch-test",
        "ray": {"address": None, "dashboard_port": dash_port},
        "task": {"classes": CLASSES},
        "ingest": {"listen": f"127.0.0.1:{ingest_port}", "store": str(tmp_path / "store"), "insecure_loopback": True,
                   "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in TOKENS.items()]},
        "training": {"strategy": "shared-key", "epochs": 2, "batch_size": 32, "start_when": list(TOKENS),
                     "wait_timeout_s": WAIT},
        "serve": {"listen": f"127.0.0.1:{serve_port}"},
    })
    with launch_in_background(cfg) as (messages, outcome):
        dashboard = next(m.split(": ", 1)[1] for m in messages if m.startswith("Ray dashboard:"))
        folders = owner_folders(tmp_path / "data", per_class=30)
        monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
        conn = {o: Connection(f"127.0.0.1:{ingest_port}", t) for o, t in TOKENS.items()}
        run_agent(SHARED, folders["hospital-a"] / "train", conn["hospital-a"], "train", progress=False,
                  accept_cloud_can_decrypt=True)
        run_agent(SHARED, folders["hospital-a"] / "test", conn["hospital-a"], "test", progress=False,
                  accept_cloud_can_decrypt=True)
        run_agent(SHARED, folders["hospital-b"] / "test", conn["hospital-b"], "test", progress=False,
                  accept_cloud_can_decrypt=True)
        run_agent(PRIVATE, folders["hospital-b"] / "test", conn["hospital-b"], "test", new_key_domain=True,
                  progress=False, accept_cloud_can_decrypt=True)
        run_agent(SHARED, folders["hospital-b"] / "train", conn["hospital-b"], "train", progress=False,
                  accept_cloud_can_decrypt=True)

        # the dashboard answers while the model trains
        wait_until(lambda: any(m.startswith("training ") for m in messages), "training to start")
        with urllib.request.urlopen(dashboard, timeout=30) as response:
            assert response.status == 200

        wait_until(lambda: any(m.startswith("prediction service on port") for m in messages) or "error" in outcome,
                   "training, evaluation and the prediction service")
        assert "error" not in outcome, outcome.get("error")
        report_path = Path(next(m.split(": ", 1)[1] for m in messages if m.startswith("report: ")))
        assert report_path.parent.parent.parent == tmp_path / "store" / "launch-test" / "runs"
        report = json.loads((report_path.parent / "report.json").read_text())
        rows = {(r["owner"], r["key_id"]): r for r in report["per_owner_key"]}
        assert set(rows) == {("hospital-a", SHARED.key_id), ("hospital-b", SHARED.key_id),
                             ("hospital-b", PRIVATE.key_id)}
        assert rows[("hospital-b", PRIVATE.key_id)]["seen_in_training"] is False
        assert rows[("hospital-a", SHARED.key_id)]["seen_in_training"] is True
        assert [e["epoch"] for e in report["epochs"]] == [1, 2]
        assert (report_path.parent / "curves.png").stat().st_size > 1000
        check_status(tmp_path, doc, capsys, report, report_path)
        check_ray_metrics(report["run"])

        images = sorted((folders["hospital-a"] / "test").glob("*/*.jpg"))[:5]
        results = predict_images(SHARED, images, Connection(f"127.0.0.1:{serve_port}", TOKENS["hospital-a"]),
                                  accept_cloud_can_decrypt=True)
        assert [r.path for r in results] == [str(p) for p in images]
        for r in results:
            assert r.error is None and r.top[0][0] in CLASSES and 0 <= r.top[0][1] <= 1
        with pytest.raises(ServiceError, match="not trained on key id"):
            predict_images(PRIVATE, images[:1], Connection(f"127.0.0.1:{serve_port}", TOKENS["hospital-b"]),
                           accept_cloud_can_decrypt=True)
        with pytest.raises(ServiceError, match="UNAUTHENTICATED"):
            predict_images(SHARED, images[:1], Connection(f"127.0.0.1:{serve_port}", "wrong-token"),
                           accept_cloud_can_decrypt=True)
        # an owner sees and uses only the key ids it uploaded under, never another owner's
        with pytest.raises(ServiceError, match="PERMISSION_DENIED: key id .* is not one you uploaded under"):
            predict_images(PRIVATE, images[:1], Connection(f"127.0.0.1:{serve_port}", TOKENS["hospital-a"]),
                           accept_cloud_can_decrypt=True)
        with grpc.insecure_channel(f"127.0.0.1:{serve_port}") as channel:
            info = pb_grpc.PredictorStub(channel).GetModelInfo(
                pb.ModelInfoRequest(), metadata=(("authorization", f"Bearer {TOKENS['hospital-a']}"),), timeout=30)
        assert list(info.key_ids) == [SHARED.key_id]


def test_killed_training_worker_resumes_from_its_last_checkpoint(tmp_path):
    import ray

    out = tmp_path / "outbox"
    settings = EncryptSettings(task=Task(tuple(CLASSES)), split="train")
    encrypt_folder(SAMPLE / "test", out, SHARED, settings, progress=False)
    refs = outbox_refs(out, "owner")
    settings = TrainingConfig(epochs=5, batch_size=25, max_failures=2)
    job = TrainJob("kill-test", Task(tuple(CLASSES)), refs, refs, settings,
                   str(tmp_path / "logs"), "test")
    metrics = tmp_path / "logs" / "metrics.jsonl"
    result = {}
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        thread = threading.Thread(target=lambda: result.update(checkpoint=run_training(job, tmp_path / "ray")))
        thread.start()
        # Ray's controller registers a reported checkpoint when it next polls the worker; once the
        # second epoch is logged, the first epoch's checkpoint is surely registered
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, "two epochs")
        first = json.loads(metrics.read_text().splitlines()[0])
        os.kill(first["worker_pid"], signal.SIGKILL)
        thread.join(WAIT)
    finally:
        ray.shutdown()
    assert "checkpoint" in result
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    pids = [e["worker_pid"] for e in epochs]
    assert len(set(pids)) == 2 and pids[0] == first["worker_pid"]
    resumed = [e["epoch"] for e in epochs if e["worker_pid"] != first["worker_pid"]]
    assert resumed[0] > 1 and resumed[-1] == 5  # continued from a checkpoint, not from scratch
    assert load_checkpoint(result["checkpoint"])["epoch"] == 4
