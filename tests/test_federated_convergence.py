"""The federated mode's convergence options: Flower's server optimisers (``federated.server_optimizer``),
more and shorter rounds (``rounds_per_epoch``), an owner-side schedule over the whole run
(``schedule: run``) and FedBN (``local_batchnorm``).

The rounds run for real in one process, as in ``tests/test_secagg.py``: the ServerApp's
``run_federated`` talks through an in-process grid to the owners' real ClientApp, which trains the
real network on real encrypted images. The grid keeps every reply the server receives, so the
tests check what travels and recompute the server's step from it.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

import orchestrator.server_app as server_app
from benchmarks.secagg_cost import InProcessGrid
from mlcore.federated import FederatedPlan, batchnorm_keys, round_batches, trunk_network, trunk_state
from mlcore.settings import TrainSettings
from orchestrator.config import ConfigError, FederatedConfig, parse_config
from orchestrator.server_app import FINAL_CHECKPOINT, plan_for, run_federated, server_step
from owners.client_app import OPTIMIZER_KEY, STATE_KEY, OwnerSite, make_client_app
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.task import Task
from tests.test_secagg import task_identity  # noqa: F401 - autouse: Flower stamps messages with a run and node

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample"
CLASSES = ("airplane", "automobile")
SETTINGS = TrainSettings(strategy="federated", epochs=1, batch_size=4, lr=0.003)


def cluster(**federated) -> dict:
    data = yaml.safe_load((ROOT / "deploy" / "local-cpu.yaml").read_text())
    data["training"].update(strategy="federated", epochs=4)
    data["federated"] = {"listen": "127.0.0.1:9092", **federated}
    return data


@pytest.mark.parametrize("federated, message", [
    ({"server_optimizer": "sgd"}, "federated.server_optimizer: 'sgd' is not one of fedavg, fedavgm"),
    ({"server_lr": 100.0}, "federated.server_lr: 100.0 is outside the allowed range"),
    ({"server_momentum": 1.0}, "federated.server_momentum: 1.0 is outside the allowed range"),
    ({"server_tau": 0.0}, "federated.server_tau: 0.0 is outside the allowed range"),
    ({"schedule": "cosine"}, "federated.schedule: 'cosine' is not one of round, run"),
    ({"rounds_per_epoch": 4, "local_epochs": 2}, "federated.rounds_per_epoch: 4 splits one local epoch"),
    ({"server_optimizer": "fedadam", "local_batchnorm": False}, "it needs federated.local_batchnorm: true"),
])
def test_bad_convergence_options_are_refused_naming_the_field(federated, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        parse_config(cluster(**federated))


def test_rounds_per_epoch_multiplies_the_rounds_and_the_plan_carries_the_owner_side():
    cfg = parse_config(cluster(rounds_per_epoch=2, server_optimizer="fedyogi"))
    plan = plan_for(cfg)
    assert (plan.rounds, plan.epochs, plan.schedule, plan.local_batchnorm) == (8, 4, "run", True)
    assert FederatedPlan.from_json(plan.to_json()) == plan
    first = plan_for(parse_config(cluster(rounds_per_epoch=1, schedule="round", local_batchnorm=False)))
    assert (first.rounds, first.schedule, first.local_batchnorm) == (4, "round", False)  # the first version


def test_short_rounds_take_each_epochs_batches_once_in_a_fresh_order_per_epoch():
    plan = FederatedPlan(Task(CLASSES), TrainSettings(strategy="federated", epochs=2, batch_size=8), rounds=6,
                         local_epochs=1, rounds_per_epoch=3)
    rounds = [round_batches(100, plan, r) for r in range(1, 7)]
    assert [done for done, _ in rounds] == [0, 4, 8, 12, 16, 20]  # 12 whole batches of 8 per epoch
    for epoch in (0, 1):
        taken = [i for _, batches in rounds[3 * epoch:3 * epoch + 3] for b in batches for i in b]
        assert len(taken) == len(set(taken)) == 96
    assert rounds[0][1][0] != rounds[3][1][0]


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[int, OwnerSite]:
    """Two owners, each with its own key and 8 different images per class."""
    root = tmp_path_factory.mktemp("owners")
    out = {}
    for i in range(2):
        images = root / f"images{i}"
        for cls in CLASSES:
            (images / cls).mkdir(parents=True)
            for f in sorted((SAMPLE / "train" / cls).iterdir())[8 * i:8 * (i + 1)]:
                (images / cls / f.name).symlink_to(f)
        key = OwnerKey(f"owner{i}", bytes([i + 1]) * 32)
        for split in ("train", "test"):
            encrypt_folder(images, root / f"o{i}" / split, key, EncryptSettings(task=Task(CLASSES), split=split),
                           progress=False)
        out[i] = OwnerSite(root / f"o{i}" / "train", root / f"o{i}" / "test", key, root / f"o{i}" / "state")
    return out


def federate(sites: dict, plan: FederatedPlan, out: Path, federated: FederatedConfig, secure: bool = False):
    app = make_client_app(sites)
    contexts = {100 + i: Context(7, 100 + i, {"partition-id": i}, RecordDict(), {}) for i in sites}
    grid = InProcessGrid({node: (app, context) for node, context in contexts.items()})
    run_federated(grid, plan, 2, 120.0, out, log=lambda *_: None, secure=secure, federated=federated)
    return grid, contexts, torch.load(out / FINAL_CHECKPOINT, weights_only=False)


def train_replies(grid: InProcessGrid) -> list[dict[str, torch.Tensor]]:
    return [m.content["arrays"].to_torch_state_dict() for m in grid.received
            if m.has_content() and "arrays" in m.content and "metrics" in m.content
            and "stored" not in m.content["metrics"]]


@pytest.mark.slow
def test_fedavgm_with_fedbn_and_short_rounds(sites, tmp_path):
    """FedAvgM (server lr 1.5, momentum 0.5) over 2 half-epoch rounds, FedBN, schedule run: no BatchNorm
    tensor reaches the server, each owner keeps its own across rounds, and the final trunk is Flower's
    FedAvgM step recomputed from the replies the server received."""
    plan = FederatedPlan(Task(CLASSES), SETTINGS, rounds=2, local_epochs=1, rounds_per_epoch=2, schedule="run",
                         local_batchnorm=True)
    federated = FederatedConfig(server_optimizer="fedavgm", server_lr=1.5, server_momentum=0.5, local_batchnorm=True,
                                rounds_per_epoch=2, schedule="run")
    grid, contexts, checkpoint = federate(sites, plan, tmp_path, federated)
    initial = trunk_state(trunk_network(plan), local_batchnorm=True)
    bn = batchnorm_keys(trunk_network(plan), "trunk.")
    replies = train_replies(grid)
    assert len(replies) == 4 and bn
    assert all(set(r) == set(initial) and not set(r) & bn for r in replies)  # the trunk less its BatchNorm
    assert not set(checkpoint["state_dict"]) & bn

    x, momentum = {k: v.double() for k, v in initial.items()}, None
    for rnd in range(2):  # both owners hold 16 images: the mean is the plain mean
        mean = {k: (replies[2 * rnd][k].double() + replies[2 * rnd + 1][k].double()) / 2 for k in x}
        step = {k: x[k] - mean[k] for k in x}
        momentum = step if momentum is None else {k: 0.5 * momentum[k] + step[k] for k in x}
        x = {k: x[k] - 1.5 * momentum[k] for k in x}
    final = checkpoint["state_dict"]
    assert all(torch.allclose(final[k].double(), x[k], atol=1e-5) for k in x)
    moved = [k for k in x if k.endswith("weight") and not torch.equal(final[k], initial[k])]
    assert len(moved) > 0.9 * len([k for k in x if k.endswith("weight")])

    kept = [contexts[100 + i].state[STATE_KEY].to_torch_state_dict() for i in sites]
    for mine in kept:
        assert bn <= set(mine)
        batches = mine[next(k for k in bn if k.endswith("num_batches_tracked"))]
        assert int(batches) == 4  # 2 rounds x 2 batches of 4: the owner's own BatchNorm survived round 1
    assert not torch.equal(*(m[next(k for k in bn if k.endswith("running_mean"))] for m in kept))
    saved = torch.load(sites[0].state_dir / f"adapter-{sites[0].key.key_id}.pt", weights_only=False)["state_dict"]
    assert bn <= set(saved)  # predicting at home needs the owner's BatchNorm next to its adapter
    steps = contexts[100].state[OPTIMIZER_KEY].to_torch_state_dict()
    assert {float(v) for k, v in steps.items() if k.endswith(".step")} == {4.0}  # one AdamW over the run


def test_server_step_is_the_strategys_step_from_the_owners_mean():
    """A secure round hands Flower's strategy the unmasked mean as the round's one reply."""
    grid = InProcessGrid({5: None, 6: None})  # two listed owners; nothing is sent
    arrays = ArrayRecord({"w": torch.zeros(3)})
    mean = ArrayRecord({"w": torch.tensor([1.0, -2.0, 0.5])})
    strategy = FedAvgM(min_train_nodes=2, min_available_nodes=2, server_learning_rate=2.0)
    stepped = server_step(strategy, 1, arrays, mean, MetricRecord({"train_loss": 1.0}), ConfigRecord({}), grid)
    assert torch.allclose(stepped.to_torch_state_dict()["w"], torch.tensor([2.0, -4.0, 1.0]))


@pytest.mark.slow
def test_secure_aggregation_with_a_server_optimizer_and_fedbn(sites, tmp_path, monkeypatch):
    """SecAgg+ with FedAdam and FedBN: owners mask updates of the trunk less its BatchNorm; the server
    ends with a finite trunk of exactly those tensors, moved from the initial one."""
    # 16 images per owner: weight them as the full range (the default is made for 32,768-image owners,
    # whose one-batch updates would otherwise fall below one quantization level and sum to 0)
    monkeypatch.setattr(server_app, "SECURE_SUM", dataclasses.replace(server_app.SECURE_SUM, max_weight=16.0))
    plan = FederatedPlan(Task(CLASSES), SETTINGS, rounds=1, local_epochs=1, local_batchnorm=True)
    federated = FederatedConfig(server_optimizer="fedadam", server_lr=0.01, local_batchnorm=True)
    grid, _, checkpoint = federate(copy.copy(sites), plan, tmp_path, federated, secure=True)
    initial = trunk_state(trunk_network(plan), local_batchnorm=True)
    final = checkpoint["state_dict"]
    assert set(final) == set(initial) and checkpoint["server_optimizer"] == "fedadam"
    assert all(torch.isfinite(v).all() for v in final.values())
    assert sum(not torch.equal(final[k], initial[k]) for k in initial) > 0.9 * len(initial)
