"""The federated mode's ML, with no Flower in it: what one owner does in a round, and what is shared.

The network is the ``key-adapters`` one: a private :class:`models.keyed.BlockAdapter` for the
owner's key in front of a trunk shared by every owner. Only the trunk's tensors (``trunk.*``)
travel; the adapter stays with its owner. The Flower apps (``orchestrator/server_app.py``,
``owners/client_app.py``) only unpack messages, call these functions and pack the results.

Budget: ``rounds x local_epochs / rounds_per_epoch`` equals the centralised strategies'
``epochs``. With ``rounds_per_epoch`` > 1 a round is that fraction of one pass over the owner's
images (more, shorter rounds: the trunk is averaged more often for the same work). ``schedule``
says how an owner's optimiser runs across rounds: ``round`` is a fresh AdamW per round with a
one-cycle whose peak follows a cosine decay across rounds; ``run`` is one AdamW whose state the
owner keeps between rounds, following one one-cycle over all its steps of the run, as centralised
training does. ``local_batchnorm`` (FedBN): the BatchNorm layers' weights and statistics stay with
each owner like its adapter; the server averages the rest of the trunk.

With secure aggregation (``federated.secure_aggregation``), an owner sends the round's *update* of
the trunk's floating-point tensors (:func:`trunk_update`) instead of the trunk, masked so that the
server learns only the owners' weighted mean update (:func:`apply_update` adds it); the numbers
that bound what a masked update can carry are :data:`SECURE_SUM`'s.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass

import torch

from mlcore.checkpoint import task_of
from mlcore.data import EncodedImages, ShardRef
from mlcore.loop import evaluate, make_optimizer, train_one_epoch
from mlcore.settings import TrainSettings, range_errors
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
    rounds_per_epoch: int = 1  # > 1: a round is 1/rounds_per_epoch of a local epoch (local_epochs is then 1)
    schedule: str = "round"  # round | run (see the module's docstring)
    local_batchnorm: bool = False  # FedBN: BatchNorm weights and statistics stay with each owner

    @property
    def epochs(self) -> float:
        return self.rounds * self.local_epochs / self.rounds_per_epoch

    def to_json(self) -> str:
        return json.dumps({"task": dataclasses.asdict(self.task), "settings": self.settings.to_dict(),
                           "rounds": self.rounds, "local_epochs": self.local_epochs,
                           "rounds_per_epoch": self.rounds_per_epoch, "schedule": self.schedule,
                           "local_batchnorm": self.local_batchnorm})

    @classmethod
    def from_json(cls, text: str) -> FederatedPlan:
        doc = json.loads(text)  # a server from before these options sends none of them: its defaults
        return cls(Task(**doc["task"]), TrainSettings.from_dict(doc["settings"]), int(doc["rounds"]),
                   int(doc["local_epochs"]), int(doc.get("rounds_per_epoch", 1)), str(doc.get("schedule", "round")),
                   bool(doc.get("local_batchnorm", False)))


SCHEDULES = ("round", "run")
MAX_ROUNDS_PER_EPOCH = 100  # a round of 1/100 epoch is a handful of steps; shorter ones only add messages


def plan_errors(plan: FederatedPlan) -> list[str]:
    """What an owner refuses in a server's plan before training on it: every bounded setting outside
    its range (``mlcore.settings``: a negative learning rate, a batch of a billion images), and a
    budget (rounds x local epochs) outside the one ``epochs`` allows."""
    s = plan.settings
    numbers = [f.name for f in dataclasses.fields(s) if "range" in f.metadata]
    errors = [f"settings.{n}: {getattr(s, n)!r} is not a number" for n in numbers
              if isinstance(getattr(s, n), bool) or not isinstance(getattr(s, n), (int, float))]
    if errors:
        return errors
    errors = range_errors(s, "settings.")
    low, high = next(f for f in dataclasses.fields(s) if f.name == "epochs").metadata["range"]
    if not (plan.rounds >= 1 and plan.local_epochs >= 1 and plan.rounds * plan.local_epochs <= high):
        errors.append(f"rounds x local_epochs: {plan.rounds} x {plan.local_epochs} is outside the allowed "
                      f"range [{low}, {high}] of epochs")
    rpe = plan.rounds_per_epoch
    if not (1 <= rpe <= MAX_ROUNDS_PER_EPOCH and plan.rounds % rpe == 0 and (rpe == 1 or plan.local_epochs == 1)):
        errors.append(f"rounds_per_epoch: {rpe!r} must be in [1, {MAX_ROUNDS_PER_EPOCH}], divide rounds "
                      f"({plan.rounds}), and go with local_epochs 1")
    if plan.schedule not in SCHEDULES:
        errors.append(f"schedule: {plan.schedule!r} is not one of {', '.join(SCHEDULES)}")
    return errors


def owner_network(plan: FederatedPlan, key_id: str) -> Network:
    """The network one owner trains: its own adapter (one key id) and the shared trunk."""
    s, t = plan.settings, plan.task
    return build_network(s.model, len(t.classes), t.model_input, [key_id]).to(memory_format=torch.channels_last)


def trunk_network(plan: FederatedPlan) -> torch.nn.Module:
    """What the server holds: the trunk alone (the same initial weights for every owner)."""
    torch.manual_seed(plan.settings.seed)
    return owner_network(plan, "server").trunk


def batchnorm_keys(module: torch.nn.Module, prefix: str = "") -> set[str]:
    """The state entries of ``module``'s BatchNorm layers (weight, bias, running statistics)."""
    layers = [name for name, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return {f"{prefix}{layer}.{entry}" for layer in layers
            for entry in module.get_submodule(layer).state_dict()}


def is_shared(model: Network, local_batchnorm: bool):
    """Whether a state entry travels: the trunk's, less its BatchNorm layers' under FedBN."""
    local = batchnorm_keys(model) if local_batchnorm else set()
    return lambda key: key.startswith(SHARED_PREFIX) and key not in local


def shared_state(model: Network, local_batchnorm: bool = False) -> dict[str, torch.Tensor]:
    shared = is_shared(model, local_batchnorm)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if shared(k)}


def trunk_state(trunk: torch.nn.Module, local_batchnorm: bool = False) -> dict[str, torch.Tensor]:
    local = batchnorm_keys(trunk) if local_batchnorm else set()
    return {SHARED_PREFIX + k: v.detach().clone() for k, v in trunk.state_dict().items() if k not in local}


def private_state(model: Network, local_batchnorm: bool = False) -> dict[str, torch.Tensor]:
    shared = is_shared(model, local_batchnorm)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not shared(k)}


@dataclass(frozen=True)
class SecureSum:
    """The numbers of the secure sum of owners' updates (Flower SecAgg+, ``orchestrator/server_app.py``).

    Each owner scales its update by ``num_examples / max_weight``, clips it to ``+-clipping_range``
    and quantizes it to ``quantization_range`` integer levels; masks are added modulo
    ``modulus_range``. So one owner's update entries can be as large as ``clipping_range x max_weight
    / num_examples`` (64 for an owner of 32,768 images: BatchNorm running variances move by ~13 in one
    epoch on CIFAR-10), with a resolution of that / 2^23, and the sum of a round's owners must stay
    below the modulus: at most ``modulus_range / quantization_range - 1`` owners per round."""

    clipping_range: float = 64.0
    quantization_range: int = 2**24
    modulus_range: int = 2**32  # Flower's largest (its masks are drawn below it)
    max_weight: float = 2.0**15  # num_examples of the largest owner that uses the full range
    min_owners: int = 2  # a sum of one owner's update is that update (SecAgg+ refuses fewer than 2)

    @property
    def max_owners(self) -> int:
        return self.modulus_range // self.quantization_range - 1


SECURE_SUM = SecureSum()


def update_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors whose update a secure round sums: the floating-point ones, in ``state``'s order.
    Integer buffers (BatchNorm's ``num_batches_tracked``, unused with a momentum) keep the server's
    value; they would only tell the server how many steps each owner took."""
    return [k for k, v in state.items() if v.is_floating_point()]


def trunk_update(trained: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One owner's update of the round: trained minus received trunk, for :func:`update_keys`."""
    return {k: (trained[k] - received[k]).detach().clone() for k in update_keys(received)}


def apply_update(state: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The next global trunk: ``state`` plus the owners' mean update (FedAvg of the trained trunks)."""
    missing = set(update_keys(state)) ^ set(update)
    if missing:
        raise ValueError(f"the aggregate does not fit the trunk: {len(missing)} tensors differ "
                         f"(e.g. {sorted(missing)[0]})")
    return {k: (v + update[k].to(v.dtype).reshape(v.shape)) if k in update else v.clone() for k, v in state.items()}


def clipped_values(update: dict[str, torch.Tensor], num_examples: int, s: SecureSum = SECURE_SUM) -> int:
    """How many entries of an owner's update the secure sum would clip (0 in any sane round)."""
    bound = s.clipping_range * s.max_weight / max(num_examples, 1)
    return int(sum((v.abs() > bound).sum().item() for v in update.values()))


def load_states(model: Network, shared: dict[str, torch.Tensor], private: dict[str, torch.Tensor] | None,
                local_batchnorm: bool = False) -> None:
    """The round's trunk from the server, plus the owner's own adapter (and, under FedBN, its own
    BatchNorm layers) when it has them already."""
    missing = [k for k in shared_state(model, local_batchnorm) if k not in shared]
    extra = [k for k in shared if not is_shared(model, local_batchnorm)(k)]
    if missing or extra:
        raise ValueError(f"the server's arrays lack {len(missing)} trunk tensors and carry {len(extra)} that do not "
                         f"travel (e.g. {(missing + extra)[0]}): owner and server disagree on the model or on FedBN")
    model.load_state_dict({**private_state(model, local_batchnorm), **(private or {}), **shared})


def round_peak_lr(plan: FederatedPlan, server_round: int) -> float:
    """Cosine decay of the per-round peak lr over the rounds (round 1 = full lr)."""
    return plan.settings.lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / max(plan.rounds, 1)))


def round_batches(num_images: int, plan: FederatedPlan, server_round: int) -> tuple[int, list[list[int]]]:
    """The batches (image indices) of one owner's round, and how many of the run's batches came before.

    Epoch ``e`` is one pass in an order drawn from (seed, e), so an owner needs no state to know
    where it is: a round of 1/``rounds_per_epoch`` epoch takes its share of that epoch's batches."""
    batch = plan.settings.batch_size
    per_epoch = num_images // batch if num_images >= batch else 1  # whole batches (a tiny owner: one)
    if plan.rounds_per_epoch == 1:
        epochs, first, last = range((server_round - 1) * plan.local_epochs, server_round * plan.local_epochs), 0, None
    else:
        epoch, part = divmod(server_round - 1, plan.rounds_per_epoch)
        epochs = range(epoch, epoch + 1)
        first, last = part * per_epoch // plan.rounds_per_epoch, (part + 1) * per_epoch // plan.rounds_per_epoch
    batches = []
    for epoch in epochs:
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(plan.settings.seed * 7919 + epoch))
        batches += [order[b * batch:(b + 1) * batch].tolist() for b in range(per_epoch)][first:last]
    return epochs[0] * per_epoch + first, batches


def optimizer_arrays(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state (moments, step) as named tensors, for the owner to keep."""
    return {f"{i}.{name}": t.detach().clone().reshape(-1) if t.dim() == 0 else t.detach().clone()
            for i, state in optimizer.state_dict()["state"].items() for name, t in state.items()}


def load_optimizer_arrays(optimizer: torch.optim.Optimizer, arrays: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in arrays.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = t.reshape(()) if name == "step" else t
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def local_train(model: Network, shards: list[ShardRef], plan: FederatedPlan, server_round: int,
                device: torch.device = CPU, optimizer_state: dict[str, torch.Tensor] | None = None) -> dict:
    """One round over the owner's own encrypted shards (:func:`round_batches`). Returns metrics incl.
    num-examples and, for ``schedule: run``, ``optimizer-state``: what the owner keeps for its next round."""
    data = EncodedImages(shards, model.key_ids)
    done, batches = round_batches(len(data), plan, server_round)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches)
    torch.manual_seed(plan.settings.seed * 7919 + server_round)
    if plan.schedule == "round":
        s = dataclasses.replace(plan.settings, lr=round_peak_lr(plan, server_round))
        optimizer, scheduler = make_optimizer(model, s, max(1, len(batches)))
    else:  # one AdamW and one one-cycle over the owner's whole run, resumed where the last round ended
        s = plan.settings
        per_epoch = len(data) // s.batch_size if len(data) >= s.batch_size else 1
        optimizer, scheduler = make_optimizer(model, s, max(1, round(plan.epochs * per_epoch)))
        if optimizer_state:
            load_optimizer_arrays(optimizer, optimizer_state)
        with warnings.catch_warnings():  # stepping the schedule to where this round starts, before any step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(done, scheduler.total_steps - len(batches))):
                scheduler.step()
    generator = torch.Generator().manual_seed(s.seed * 1000 + server_round)
    metrics = train_one_epoch(model, loader, optimizer, scheduler, s, plan.task, device, generator) if batches else {
        "train_loss": 0.0, "train_acc": 0.0}
    kept = {"optimizer-state": optimizer_arrays(optimizer)} if plan.schedule == "run" else {}
    return {**metrics, "num-examples": len(data), **kept}


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
