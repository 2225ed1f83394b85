"""The owner's Flower client (ClientApp, Message API) for the federated mode.

Each round: take the server's trunk, put the owner's private adapter in front of it, train on the
owner's own encrypted shards (``mlcore/federated.py``), send back the trunk only. The adapter
stays here: in the run's context state, and on disk (``<state-dir>/adapter-<key id>.pt``) for
predictions at the owner. ``adapter_init = "key"`` (default) starts the adapter at the exact
inverse of the owner's key, which only the owner can compute; ``"learned"`` starts it at identity
and learns it like the cloud's key-adapters strategy does.

``app`` is what a SuperNode started by ``owner-agent federate`` runs; its node config names the
outbox folders, the key (a keyring name or key-file path, never the secret) and the state folder.
``make_client_app`` builds the same client for Flower's simulation, one site per partition.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mlcore.checkpoint import header
from mlcore.data import ShardRef, shard_refs
from mlcore.federated import (
    FederatedPlan,
    load_states,
    local_evaluate,
    local_train,
    owner_network,
    private_state,
    shared_state,
)
from models.keyed import BlockAdapter
from owners.adapters import inverse_setting
from owners.cipher import CipherGeometry, derive_schedule
from owners.errors import OutboxError, OwnerError
from owners.files import private_dir
from owners.keys import OwnerKey, resolve_key
from protocol.shards import Manifest

ADAPTER_INITS = ("key", "learned")
STATE_KEY = "private-adapter"
TRUNK_FILE = "trunk.pt"  # the federation's final trunk, next to the adapter: together, the owner's model


@dataclass(frozen=True)
class OwnerSite:
    """One owner's side of the federation."""

    train: Path  # outbox folder of the encrypted train split (owner-agent encrypt)
    test: Path | None  # outbox folder of a test split, evaluated each round (optional)
    key: OwnerKey
    state_dir: Path  # the private adapter is saved here
    adapter_init: str = "key"  # key | learned


def site_from_node_config(node_config: dict) -> OwnerSite:
    def get(name: str, default=None):
        value = node_config.get(name, default)
        return None if value in (None, "") else str(value)

    missing = [n for n in ("train", "key", "state-dir") if get(n) is None]
    if missing:
        raise OwnerError(f"node config lacks {', '.join(missing)} (owner-agent federate sets them)")
    key, _ = resolve_key(get("key"), create=False)
    init = get("adapter-init", "key")
    if init not in ADAPTER_INITS:
        raise OwnerError(f"node config adapter-init: {init!r} is not one of {', '.join(ADAPTER_INITS)}")
    test = get("test")
    return OwnerSite(Path(get("train")), Path(test) if test else None, key, Path(get("state-dir")), init)


def shards_of(folder: Path, key: OwnerKey, plan: FederatedPlan) -> tuple[ShardRef, ...]:
    """The outbox's shards, after checking they fit this key and the server's task."""
    m = Manifest.load(folder)
    t = plan.task
    if m.key_id != key.key_id:
        raise OutboxError(f"{folder}: encrypted under key id {m.key_id}, but this owner's key is {key.key_id}")
    if (m.scheme, m.image_size, m.block_size) != (t.scheme, t.image_size, t.block_size):
        raise OutboxError(f"{folder}: {m.scheme} {m.image_size}px block {m.block_size}, but the task asks for "
                          f"{t.scheme} {t.image_size}px block {t.block_size}")
    if list(m.classes) != list(t.classes):
        raise OutboxError(f"{folder}: classes {m.classes} differ from the task's {list(t.classes)}")
    return shard_refs(m.shards, lambda s: folder / s.name, "me", m.key_id, m.split)


def build_model(site: OwnerSite, plan: FederatedPlan, msg: Message, context: Context):
    """The owner's network for this round: the server's trunk behind the owner's own adapter."""
    model = owner_network(plan, site.key.key_id)
    private = context.state[STATE_KEY].to_torch_state_dict() if STATE_KEY in context.state else None
    if private is None and site.adapter_init == "key":
        if not isinstance(model.adapters[0], BlockAdapter):
            raise OwnerError(f"adapter-init 'key' sets a block adapter to the key's exact inverse; model "
                             f"{plan.settings.model} has a {type(model.adapters[0]).__name__}, which is learned: "
                             "join with --adapter-init learned")
        schedule = derive_schedule(site.key.secret, CipherGeometry.for_task(plan.task))
        model.adapters[0].set_exact(*inverse_setting(schedule, plan.task.model_input.in_chans))
        private = private_state(model)
    load_states(model, msg.content["arrays"].to_torch_state_dict(), private)
    return model


def note_status(site: OwnerSite, server_round: int, phase: str) -> None:
    """<state-dir>/status.json: what this owner's client is doing (for the owner, and tests)."""
    private_dir(site.state_dir)
    tmp = site.state_dir / ".status.json.partial"
    tmp.write_text(json.dumps({"round": server_round, "phase": phase, "time": time.time(), "pid": os.getpid()}))
    tmp.replace(site.state_dir / "status.json")


def handle_train(site: OwnerSite, msg: Message, context: Context) -> Message:
    plan = FederatedPlan.from_json(str(msg.content["config"]["plan"]))
    server_round = int(msg.content["config"]["server-round"])
    note_status(site, server_round, "training")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    model = build_model(site, plan, msg, context)
    metrics = local_train(model, list(shards_of(site.train, site.key, plan)), plan, server_round)
    context.state[STATE_KEY] = ArrayRecord(private_state(model))
    private_dir(site.state_dir)
    tmp = site.state_dir / f".adapter-{site.key.key_id}.pt.partial"
    torch.save({"key_id": site.key.key_id, "state_dict": private_state(model)}, tmp)
    tmp.replace(site.state_dir / f"adapter-{site.key.key_id}.pt")
    note_status(site, server_round, "trained")
    reply = RecordDict({"arrays": ArrayRecord(shared_state(model)),  # the trunk only
                        "metrics": MetricRecord({"train_loss": metrics["train_loss"],
                                                 "train_acc": metrics["train_acc"],
                                                 "num-examples": metrics["num-examples"]})})
    return Message(content=reply, reply_to=msg)


def handle_evaluate(site: OwnerSite, msg: Message, context: Context) -> Message:
    plan = FederatedPlan.from_json(str(msg.content["config"]["plan"]))
    if site.test is None:  # Flower counts this reply as a failure; the round goes on without it
        raise OwnerError("this owner has no test split to evaluate on (owner-agent federate --test-data)")
    model = build_model(site, plan, msg, context)
    metrics = local_evaluate(model, list(shards_of(site.test, site.key, plan)), plan)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_final_trunk(site: OwnerSite, msg: Message, context: Context) -> Message:
    """The federation's final trunk: checked against the owner's network, then kept next to the
    owner's adapter (``<state-dir>/trunk.pt``) for ``owner-agent predict --federated``."""
    plan = FederatedPlan.from_json(str(msg.content["config"]["plan"]))
    shared = msg.content["arrays"].to_torch_state_dict()
    load_states(owner_network(plan, site.key.key_id), shared, None)  # refuses arrays that do not fit
    private_dir(site.state_dir)
    tmp = site.state_dir / ".trunk.pt.partial"
    torch.save({**header(plan.task, plan.settings, []), "state_dict": shared}, tmp)
    tmp.replace(site.state_dir / TRUNK_FILE)
    note_status(site, 0, "trunk stored")
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1})}), reply_to=msg)


def make_client_app(sites: dict[int, OwnerSite]) -> ClientApp:
    """For Flower's simulation: partition-id picks the owner."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(sites[int(context.node_config["partition-id"])], msg, context)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(sites[int(context.node_config["partition-id"])], msg, context)

    @client.query()
    def final_trunk(msg: Message, context: Context) -> Message:
        return handle_final_trunk(sites[int(context.node_config["partition-id"])], msg, context)

    return client


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(site_from_node_config(dict(context.node_config)), msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(site_from_node_config(dict(context.node_config)), msg, context)


@app.query()
def final_trunk(msg: Message, context: Context) -> Message:
    return handle_final_trunk(site_from_node_config(dict(context.node_config)), msg, context)
