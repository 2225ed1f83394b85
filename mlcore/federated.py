"""The federated mode's ML, with no Flower in it: what one owner does in a round, and what is shared.

The network is the ``key-adapters`` one: a private :class:`models.keyed.BlockAdapter` for the
owner's key in front of a trunk shared by every owner. Only the trunk's tensors (``trunk.*``)
travel; the adapter stays with its owner. The Flower apps (``orchestrator/server_app.py``,
``owners/client_app.py``) only unpack messages, call these functions and pack the results.

Budget: ``rounds x local_epochs`` equals the centralised strategies' ``epochs``; each round is a
fresh AdamW with a one-cycle schedule whose peak follows a cosine decay across rounds.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from mlcore.checkpoint import task_of
from mlcore.data import EncodedImages, ShardRef
from mlcore.loop import evaluate, make_optimizer, train_one_epoch
from mlcore.settings import TrainSettings
from models import SHARED_PREFIX, Network, build_network
from protocol.task import Task

CPU = torch.device("cpu")  # owners train on CPU unless told otherwise


@dataclass(frozen=True)
class FederatedPlan:
    """What the server tells every owner (sent as JSON in each round's config)."""

    task: Task
    settings: TrainSettings  # the ML settings only: never the cloud's own
    rounds: int
    local_epochs: int

    def to_json(self) -> str:
        return json.dumps({"task": dataclasses.asdict(self.task), "settings": self.settings.to_dict(),
                           "rounds": self.rounds, "local_epochs": self.local_epochs})

    @classmethod
    def from_json(cls, text: str) -> FederatedPlan:
        doc = json.loads(text)
        return cls(Task(**doc["task"]), TrainSettings.from_dict(doc["settings"]), int(doc["rounds"]),
                   int(doc["local_epochs"]))


def owner_network(plan: FederatedPlan, key_id: str) -> Network:
    """The network one owner trains: its own adapter (one key id) and the shared trunk."""
    s, t = plan.settings, plan.task
    return build_network(s.model, len(t.classes), t.model_input, [key_id]).to(memory_format=torch.channels_last)


def trunk_network(plan: FederatedPlan) -> torch.nn.Module:
    """What the server holds: the trunk alone (the same initial weights for every owner)."""
    torch.manual_seed(plan.settings.seed)
    return owner_network(plan, "server").trunk


def shared_state(model: Network) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(SHARED_PREFIX)}


def trunk_state(trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {SHARED_PREFIX + k: v.detach().clone() for k, v in trunk.state_dict().items()}


def private_state(model: Network) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(SHARED_PREFIX)}


def load_states(model: Network, shared: dict[str, torch.Tensor], private: dict[str, torch.Tensor] | None) -> None:
    """The round's trunk from the server, plus the owner's own adapter when it has one already."""
    missing = [k for k in shared_state(model) if k not in shared]
    if missing:
        raise ValueError(f"the server's arrays lack {len(missing)} trunk tensors (e.g. {missing[0]}): "
                         "owner and server disagree on the model")
    model.load_state_dict({**private_state(model), **(private or {}), **shared})


def round_peak_lr(plan: FederatedPlan, server_round: int) -> float:
    """Cosine decay of the per-round peak lr over the rounds (round 1 = full lr)."""
    return plan.settings.lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / max(plan.rounds, 1)))


def local_train(model: Network, shards: list[ShardRef], plan: FederatedPlan, server_round: int,
                device: torch.device = CPU) -> dict:
    """``local_epochs`` over the owner's own encrypted shards. Returns metrics incl. num-examples."""
    s = dataclasses.replace(plan.settings, lr=round_peak_lr(plan, server_round))
    torch.manual_seed(s.seed * 7919 + server_round)
    data = EncodedImages(shards, model.key_ids)
    loader = torch.utils.data.DataLoader(data, batch_size=s.batch_size, shuffle=True,
                                         drop_last=len(data) >= s.batch_size)
    optimizer, scheduler = make_optimizer(model, s, max(1, plan.local_epochs * len(loader)))
    generator = torch.Generator().manual_seed(s.seed * 1000 + server_round)
    metrics = {}
    for _ in range(plan.local_epochs):
        metrics = train_one_epoch(model, loader, optimizer, scheduler, s, plan.task, device, generator)
    return {**metrics, "num-examples": len(data)}


def local_evaluate(model: Network, shards: list[ShardRef], plan: FederatedPlan,
                   device: torch.device = CPU) -> dict:
    key = model.key_ids[0]
    result = evaluate(model, EncodedImages(shards, [key]), [key], plan.settings, device)
    return {"test_acc": result["test_acc"], "num-examples": result["per_group"][key]["images"]}


def owner_model(trunk_checkpoint: dict, adapter: dict) -> Network:
    """The model an owner predicts with: the federation's final trunk plus its private adapter
    (``<state-dir>/adapter-<key id>.pt``). Nobody else holds both."""
    t = task_of(trunk_checkpoint)  # always the adapter network, whatever the strategy's name
    model = build_network(trunk_checkpoint["model"], len(t.classes), t.model_input, [adapter["key_id"]])
    model.load_state_dict({**adapter["state_dict"], **trunk_checkpoint["state_dict"]})
    return model.to(memory_format=torch.channels_last).eval()
