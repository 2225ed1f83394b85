"""Ray Train with two workers (DDP over gloo on CPU), and on a Ray cluster of two nodes on this machine.

Real local Ray, real training on the sample's 200 test images (encrypted): both ranks train their
half of every epoch, the checkpoint rebuilds the model, and a killed worker group resumes from the
last checkpoint. The two-node test joins the cluster by its address, as ``start_ray`` does for
``ray.address``, and checks that the two workers ran on two different nodes.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from mlcore import checkpoint as ckpt
from mlcore.data import EncodedImages, group_names, outbox_refs
from mlcore.loop import evaluate
from orchestrator.config import RayConfig, TrainingConfig
from orchestrator.launch import _single_machine_ray, start_ray
from orchestrator.training import TrainJob, run_training
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.task import Task

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample" / "test"  # 20 images per class
CLASSES = tuple(sorted(p.name for p in SAMPLE.iterdir()))
KEY_A = OwnerKey("mw-a", bytes(range(32)))
KEY_B = OwnerKey("mw-b", bytes(range(50, 82)))
WAIT = 300  # seconds: upper bound of any wait below


def encrypt_half(root: Path, key: OwnerKey, half: int) -> tuple:
    """Half of the sample's images per class (10), encrypted under ``key``: 100 images."""
    for cls in CLASSES:
        target = root / "plain" / key.key_id / cls
        target.mkdir(parents=True)
        for f in sorted((SAMPLE / cls).iterdir())[half * 10:(half + 1) * 10]:
            (target / f.name).symlink_to(f)
    out = root / "outbox" / key.key_id
    encrypt_folder(root / "plain" / key.key_id, out, key, EncryptSettings(task=Task(CLASSES), split="train"),
                   progress=False)
    return outbox_refs(out, "owner")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Two keys' datasets of 100 images each."""
    root = tmp_path_factory.mktemp("multiworker")
    return encrypt_half(root, KEY_A, 0), encrypt_half(root, KEY_B, 1)


def make_job(name: str, train: tuple, tmp_path: Path, **settings) -> TrainJob:
    s = TrainingConfig(workers=2, cpus_per_worker=1, max_failures=1, **settings)
    return TrainJob(name, Task(CLASSES), train, train, s, str(tmp_path / "logs"), "test")


def epochs_logged(job: TrainJob) -> list[dict]:
    path = Path(job.log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def assert_both_ranks_trained(epoch: dict, images: int, batch: int) -> None:
    """Two ranks, two processes, each its own half of the epoch (DistributedSampler, drop_last)."""
    ranks = sorted(epoch["ranks"], key=lambda r: r["rank"])
    assert epoch["world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2
    assert [r["images"] for r in ranks] == [images // 2 // batch * batch] * 2


@pytest.fixture()
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_two_workers_train_a_plain_network_and_resume_after_a_killed_worker(refs, tmp_path, local_ray):
    train = refs[0] + refs[1]  # one model for both keys' images: 200 images, 100 per rank
    job = make_job("mw-plain", train, tmp_path, strategy="pooled", epochs=3, batch_size=25)
    result = {}
    thread = threading.Thread(target=lambda: result.update(checkpoint=run_training(job, tmp_path / "ray")))
    thread.start()
    # once the second epoch is logged, the first epoch's checkpoint is surely registered
    wait_until(lambda: len(epochs_logged(job)) >= 2 or not thread.is_alive(), "two epochs")
    first = epochs_logged(job)[0]
    os.kill(first["worker_pid"], signal.SIGKILL)  # rank 0: Ray restarts the whole worker group
    thread.join(WAIT)
    assert "checkpoint" in result, "training did not finish"
    epochs = epochs_logged(job)
    for e in epochs:
        assert_both_ranks_trained(e, 200, 25)
    resumed = [e["epoch"] for e in epochs if e["worker_pid"] != first["worker_pid"]]
    assert resumed and resumed[0] > 1 and resumed[-1] == 3  # continued from a checkpoint, not from scratch
    assert ckpt.load_checkpoint(result["checkpoint"])["epoch"] == 2


def test_two_workers_train_a_keyed_network_whose_checkpoint_rebuilds_it(refs, tmp_path, local_ray):
    train = refs[0] + refs[1]
    job = make_job("mw-keyed", train, tmp_path, strategy="key-adapters", epochs=2, batch_size=20)
    checkpoint = run_training(job, tmp_path / "ray")
    epochs = epochs_logged(job)
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert_both_ranks_trained(e, 200, 20)
    payload = ckpt.load_checkpoint(checkpoint)
    assert payload["key_ids"] == sorted([KEY_A.key_id, KEY_B.key_id]) and payload["epoch"] == 1
    model = ckpt.model_from_checkpoint(payload)
    data = EncodedImages(list(train), group_names(list(train)), job.task)
    again = evaluate(model, data, group_names(list(train)), job.settings, torch.device("cpu"))
    assert again["test_acc"] == pytest.approx(epochs[-1]["test_acc"])  # the weights rank 0 evaluated


def test_two_node_cluster_spreads_the_workers_over_both_nodes(refs, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    _single_machine_ray()  # both nodes on 127.0.0.1, as a local Ray of the product: nothing on the network
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        start_ray(RayConfig(address=cluster.address), log=lambda _: None)  # as for ray.address in cluster.yaml
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        job = make_job("mw-nodes", refs[0] + refs[1], tmp_path, strategy="pooled", epochs=1, batch_size=25)
        checkpoint = run_training(job, tmp_path / "ray")  # one storage path: both nodes see this filesystem
        (epoch,) = epochs_logged(job)
        assert_both_ranks_trained(epoch, 200, 25)
        assert {r["node_id"] for r in epoch["ranks"]} == nodes  # one worker per node (1 CPU each)
        assert ckpt.load_checkpoint(checkpoint)["epoch"] == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
