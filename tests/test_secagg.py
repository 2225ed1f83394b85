"""Secure aggregation in the federated mode (``federated.secure_aggregation``: Flower's SecAgg+).

The fast tests run the real pieces in one process: the ServerApp's ``run_federated`` (with Flower's
``SecAggPlusWorkflow``) talks through an in-process grid to the owners' real ClientApp (Flower's
``secaggplus_mod`` in front of ``handle_train``); only the owners' training is replaced by a known,
seeded change of the trunk, so that each owner's true update is known exactly. The grid keeps
every message the server receives: the proof is that none of them holds an owner's update, while
the trunk the server ends with is the initial one plus the owners' weighted mean update. The slow
test is a real federation on loopback (``orchestrator federate`` and three ``owner-agent
federate``), one owner killed mid-round.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

import owners.client_app as client_app
from benchmarks.secagg_cost import InProcessGrid, LoopbackFederation
from mlcore.federated import SECURE_SUM, FederatedPlan, trunk_network, trunk_state
from mlcore.settings import TrainSettings
from orchestrator.config import ConfigError, parse_config
from orchestrator.server_app import FINAL_CHECKPOINT, run_federated
from owners.client_app import OwnerSite, check_secagg_request, make_client_app
from owners.errors import OwnerError
from owners.keys import OwnerKey
from protocol.task import Task

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile")
PLAN = FederatedPlan(Task(CLASSES), TrainSettings(strategy="federated", epochs=1, batch_size=8, lr=0.003),
                     rounds=1, local_epochs=1)
EXAMPLES = (20_000, 12_000, 7_000)  # each owner's (pretended) number of training images
RUNNING_VAR_STEP = 13.0  # how far BatchNorm running variances moved in one CIFAR-10 round (measured)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are stamped with the process's run and node (Flower sets them in its processes)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def owners(tmp_path, monkeypatch):
    """Three owners whose 'training' adds a known seeded change to the trunk; the true update each
    owner computes is recorded (by owner: 0, 1, 2) as it is computed at the owner."""
    sites = {i: OwnerSite(tmp_path / "none", tmp_path / "none", OwnerKey(f"owner{i}", bytes([i + 1]) * 32),
                          tmp_path / f"state{i}") for i in range(3)}
    index = {site.key.key_id: i for i, site in sites.items()}
    truth: dict[int, dict[str, torch.Tensor]] = {}
    trained: dict[int, dict[str, torch.Tensor]] = {}
    current = {}

    def fake_train(model, shards, plan, server_round, device=None, optimizer_state=None):
        owner = current["owner"] = index[model.key_ids[0]]
        gen = torch.Generator().manual_seed(1000 * owner + server_round)
        with torch.no_grad():
            for name, tensor in model.trunk.state_dict().items():
                if tensor.is_floating_point():
                    tensor += RUNNING_VAR_STEP if name.endswith("running_var") else \
                        0.01 * torch.randn(tensor.shape, generator=gen)
        trained[owner] = {k: v.clone() for k, v in client_app.shared_state(model).items()}
        return {"train_loss": 1.0, "train_acc": 0.5, "num-examples": EXAMPLES[owner]}

    def spy_update(after, before):
        update = real_update(after, before)
        truth[current["owner"]] = update
        return update

    real_update = client_app.trunk_update
    monkeypatch.setattr(client_app, "local_train", fake_train)
    monkeypatch.setattr(client_app, "trunk_update", spy_update)
    monkeypatch.setattr(client_app, "shards_of", lambda *a: ())
    monkeypatch.setattr(client_app, "local_evaluate", lambda *a: {"test_acc": 0.5, "num-examples": 10})
    return sites, truth, trained


def federation(sites: dict, count: int, drop: dict[int, str] | None = None, unlist: bool = False) -> InProcessGrid:
    app = make_client_app({i: sites[i] for i in range(count)})
    nodes = {100 + i: (app, Context(7, 100 + i, {"partition-id": i}, RecordDict(), {})) for i in range(count)}
    return InProcessGrid(nodes, drop, unlist)


def run(grid: InProcessGrid, out: Path, secure: bool = True, rounds: int = 1) -> dict:
    plan = FederatedPlan(PLAN.task, PLAN.settings, rounds=rounds, local_epochs=1)
    run_federated(grid, plan, 2, 60.0, out, log=lambda *_: None, secure=secure)
    return torch.load(out / FINAL_CHECKPOINT, weights_only=False)


def initial_trunk() -> dict[str, torch.Tensor]:
    return trunk_state(trunk_network(PLAN))


def weighted_mean(updates: dict[int, dict], owners: list[int]) -> dict[str, torch.Tensor]:
    total = sum(EXAMPLES[i] for i in owners)
    return {k: sum(updates[i][k].double() * EXAMPLES[i] for i in owners) / total for k in updates[owners[0]]}


def tolerance(owners: list[int]) -> float:
    """Stochastic rounding moves each owner's scaled entry by less than one quantization level;
    the unmasked sum is divided by the owners' total weight over max_weight. Plus float32 rounding."""
    s = SECURE_SUM
    level = 2 * s.clipping_range / s.quantization_range
    return len(owners) * level * s.max_weight / sum(EXAMPLES[i] for i in owners) + 1e-5


def blobs(msg: Message) -> list[bytes]:
    """Every array and every bytes value a message carries."""
    out = []
    for record in msg.content.values():
        for value in record.values():
            if hasattr(value, "data"):
                out.append(value.data)
            elif isinstance(value, bytes):
                out.append(value)
            elif isinstance(value, list):
                out += [v for v in value if isinstance(v, bytes)]
    return out


def masked_vectors(grid: InProcessGrid) -> list[np.ndarray]:
    vectors = []
    for msg in grid.received:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            vectors.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in configs[Key.MASKED_PARAMETERS]]))
    return vectors


def assert_no_update_received(grid: InProcessGrid, truth: dict, trained: dict) -> None:
    """No reply carries an array, and no byte string of any reply contains an owner's update or
    trained trunk (a 64-byte run of any of its larger tensors)."""
    for msg in grid.received:
        if msg.has_content():
            assert all(len(record) == 0 for record in msg.content.array_records.values())
    payload = b"".join(b for msg in grid.received if msg.has_content() for b in blobs(msg))
    for owner in (*truth.values(), *trained.values()):
        for tensor in owner.values():
            if tensor.numel() >= 64:
                raw = tensor.float().numpy().tobytes()
                assert raw[:64] not in payload and raw[len(raw) // 2:len(raw) // 2 + 64] not in payload


def test_the_server_sees_only_the_sum_of_the_owners_updates(owners, tmp_path):
    sites, truth, trained = owners
    grid = federation(sites, 3)
    payload = run(grid, tmp_path / "out")
    assert sorted(truth) == [0, 1, 2]
    assert_no_update_received(grid, truth, trained)
    # What the server got from each owner instead: a vector masked modulo 2^32, spread over the
    # whole modulus; an unmasked one would lie in [0, quantization_range], 1/256 of it.
    vectors = masked_vectors(grid)
    assert len(vectors) == 3
    for vector in vectors:
        assert np.mean(vector <= SECURE_SUM.quantization_range) < 0.01
        assert abs(np.mean(vector) / SECURE_SUM.modulus_range - 0.5) < 0.01
    # ... and from the masked vectors, only the weighted mean update: the trunk is FedAvg's
    mean, start = weighted_mean(truth, [0, 1, 2]), initial_trunk()
    assert max((payload["state_dict"][k].double() - start[k].double() - mean[k]).abs().max().item()
               for k in mean) < tolerance([0, 1, 2])
    assert payload["secure_aggregation"] is True
    assert [r["round"] for r in payload["rounds"]] == [1]
    record = payload["rounds"][0]
    assert record["train/clipped"] == 0 and record["train/num-examples"] > 0
    assert record["round_s"] > 0 and record["received_MB"] > 0
    # BatchNorm variances moved by 13 and came through (no clipping)
    var = next(k for k in mean if k.endswith("running_var"))
    assert torch.allclose(payload["state_dict"][var].double() - start[var].double(),
                          torch.full_like(mean[var], RUNNING_VAR_STEP), atol=tolerance([0, 1, 2]))


def test_plain_fedavg_receives_each_owners_trunk(owners, tmp_path):
    """The control: without secure aggregation the same detector finds every owner's trained trunk."""
    sites, truth, trained = owners
    grid = federation(sites, 2)
    run(grid, tmp_path / "out", secure=False)
    received = [msg.content["arrays"].to_torch_state_dict() for msg in grid.received
                if msg.has_content() and "arrays" in msg.content.array_records]
    assert len(received) == 2
    for owner in trained.values():
        assert any(all(torch.equal(r[k], v) for k, v in owner.items()) for r in received)


def test_an_owner_dropping_out_mid_round_leaves_the_others_sum(owners, tmp_path):
    """3 owners, threshold 2: one vanishes before sending its masked update; the survivors' shares
    remove its masks and the round aggregates the two others, still without seeing either."""
    sites, truth, trained = owners
    grid = federation(sites, 3, drop={102: Stage.COLLECT_MASKED_VECTORS})
    payload = run(grid, tmp_path / "out")
    assert sorted(truth) == [0, 1]  # owner 2 never trained
    assert_no_update_received(grid, truth, trained)
    mean, start = weighted_mean(truth, [0, 1]), initial_trunk()
    assert max((payload["state_dict"][k].double() - start[k].double() - mean[k]).abs().max().item()
               for k in mean) < tolerance([0, 1])


def test_with_two_owners_a_dropout_halts_the_round_and_reveals_nothing(owners, tmp_path):
    """2 owners, threshold 2: if one vanishes, the other's masked update cannot be unmasked: the
    round keeps the trunk as it was (plain FedAvg would have taken the survivor's trunk as is)."""
    sites, truth, trained = owners
    grid = federation(sites, 2, drop={101: Stage.COLLECT_MASKED_VECTORS})
    payload = run(grid, tmp_path / "out")
    assert sorted(truth) == [0]
    assert_no_update_received(grid, truth, trained)
    start = initial_trunk()
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in start.items())
    assert [r["round"] for r in payload["rounds"]] == [1] and "train/train_loss" not in payload["rounds"][0]


def test_an_owner_lost_at_the_unmask_is_still_summed(owners, tmp_path):
    """Its masked update arrived; the two others hold enough shares of its private mask."""
    sites, truth, trained = owners
    grid = federation(sites, 3, drop={102: Stage.UNMASK})
    payload = run(grid, tmp_path / "out")
    mean, start = weighted_mean(truth, [0, 1, 2]), initial_trunk()
    assert max((payload["state_dict"][k].double() - start[k].double() - mean[k]).abs().max().item()
               for k in mean) < tolerance([0, 1, 2])


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
def test_an_owner_lost_before_the_key_exchange_costs_one_round(owners, tmp_path, stage):
    """Flower 1.41's SecAgg+ keeps an owner that failed before handing out its key shares among the
    round's owners, and the others hold no share of its keys: the round cannot unmask and keeps the
    trunk. The next round (without it) aggregates."""
    sites, truth, trained = owners
    grid = federation(sites, 3, drop={102: stage}, unlist=True)
    payload = run(grid, tmp_path / "out", rounds=2)
    rounds = {r["round"]: r for r in payload["rounds"]}
    assert "train/train_loss" not in rounds[1] and "train/train_loss" in rounds[2]
    assert_no_update_received(grid, truth, trained)


@pytest.mark.parametrize("configs, message", [
    ({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 4, Key.SHARE_NUMBER: 4, Key.THRESHOLD: 2}, "above half"),
    ({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 1, Key.SHARE_NUMBER: 1, Key.THRESHOLD: 1}, "2 owners or more"),
    ({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3}, "lacks its numbers"),
    ({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [101, 102], Key.DEAD_NODE_ID_LIST: [102]}, "both alive"),
    ({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [101], Key.DEAD_NODE_ID_LIST: [100]}, "this owner dropped"),
])
def test_owner_refuses_requests_that_would_unmask_it(configs, message):
    with pytest.raises(OwnerError, match=message):
        check_secagg_request(ConfigRecord(configs), 100)
    check_secagg_request(ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3,
                                       Key.THRESHOLD: 2}), 100)
    check_secagg_request(ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [100, 101],
                                       Key.DEAD_NODE_ID_LIST: [102]}), 100)


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 1_000_000_000}, "settings.batch_size: 1000000000 is outside the allowed range"),
    ({"lr": -0.1}, "settings.lr: -0.1 is outside the allowed range"),
    ({"lr": "fast"}, "settings.lr: 'fast' is not a number"),
    ({"rounds": 10**6}, "rounds x local_epochs: 1000000 x 1 is outside the allowed range"),
])
def test_owner_refuses_a_plan_out_of_range_before_training(owners, tmp_path, change, message):
    sites, _, _ = owners
    doc = json.loads(PLAN.to_json())
    for k, v in change.items():
        (doc if k == "rounds" else doc["settings"])[k] = v
    app = make_client_app(sites)
    context = Context(7, 100, {"partition-id": 0}, RecordDict(), {})
    arrays = ArrayRecord(initial_trunk())
    for message_type in ("train", "evaluate"):
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"plan": json.dumps(doc),
                                                                            "server-round": 1})}),
                      dst_node_id=100, message_type=message_type)
        with pytest.raises(OwnerError, match=f"refused the server's plan: .*{message}"):
            app(msg, context)
    assert not (sites[0].state_dir / "status.json").exists()  # refused before anything ran


def test_check_refuses_secure_aggregation_that_cannot_work():
    data = yaml.safe_load((ROOT / "deploy" / "federated-local.yaml").read_text())
    data["federated"].update(secure_aggregation=True, min_owners=1)
    with pytest.raises(ConfigError, match=r"federated.min_owners: 1 is outside \[2, 255\].*secure aggregation"):
        parse_config(copy.deepcopy(data))
    data["federated"]["min_owners"] = 256
    with pytest.raises(ConfigError, match="federated.min_owners: 256"):
        parse_config(copy.deepcopy(data))
    data["federated"]["min_owners"] = 2
    assert parse_config(copy.deepcopy(data)).federated.secure_aggregation
    data["training"]["strategy"] = "key-adapters"
    with pytest.raises(ConfigError, match="federated.secure_aggregation: only for training.strategy 'federated'"):
        parse_config(copy.deepcopy(data))


@pytest.mark.slow
def test_a_secure_federation_on_loopback_survives_an_owner_killed_mid_round(tmp_path):
    """The product as deployed, with ``federated.secure_aggregation: true``: ``orchestrator
    federate`` and three owners on 127.0.0.1; one owner is SIGKILLed while it trains in round 2.
    The survivors' shares remove its masks, and every round aggregates."""
    owners = ["clinic-a", "clinic-b", "clinic-c"]
    fed = LoopbackFederation(tmp_path, owners, ROOT / "examples" / "cifar10-sample" / "train", secure=True,
                             rounds=3, train_per_class=10, test_per_class=4)
    deadline = time.monotonic() + 600
    try:
        fed.start()
        while (fed.status("clinic-c") or {}).get("round") != 2 or fed.status("clinic-c")["phase"] != "training":
            for name, proc in fed.procs.items():
                assert proc.poll() is None, f"{name} exited early: {(fed.logs / f'{name}.err').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "clinic-c never reached round 2"
            time.sleep(0.5)
        fed.kill("clinic-c")
        result = fed.wait(max(1.0, deadline - time.monotonic()))
    finally:
        fed.stop()
    rounds = [json.loads(line) for line in Path(result["metrics"]).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all("train/train_loss" in r for r in rounds[:2])  # round 2 aggregated without clinic-c
    assert all(r["train/clipped"] == 0 for r in rounds if "train/clipped" in r)
    server_log = (Path(result["trunk_checkpoint"]).parents[1] / "serverapp.log").read_text()
    assert server_log.count("Secure aggregation completed") >= 2
    payload = torch.load(result["trunk_checkpoint"], map_location="cpu", weights_only=False)
    assert payload["secure_aggregation"] is True and all(k.startswith("trunk.") for k in payload["state_dict"])
    for owner in owners[:2]:  # the survivors got the final trunk, to predict at home
        assert (fed.home(owner) / "federated" / "secagg-cost" / owner / "trunk.pt").exists()
