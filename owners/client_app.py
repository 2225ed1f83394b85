"""The owner's Flower client (ClientApp, Message API) for the federated mode.

Each round: take the server's trunk, put the owner's private adapter in front of it, train on the
owner's own encrypted shards (``mlcore/federated.py``), send back the trunk only. The adapter
stays here (with FedBN, ``local_batchnorm``, the trunk's BatchNorm layers too): in the run's
context state, and on disk (``<state-dir>/adapter-<key id>.pt``) for predictions at the owner.
With ``schedule: run`` the owner's AdamW state also stays in the context state between rounds.
``adapter_init = "key"`` (default) starts the adapter at the exact inverse of the owner's key,
which only the owner can compute; ``"learned"`` starts it at identity and learns it
like the cloud's key-adapters strategy does.

``app`` is what a SuperNode started by ``owner-agent federate`` runs; its node config names the
outbox folders, the key (a keyring name or key-file path, never the secret) and the state folder.
``make_client_app`` builds the same client for Flower's simulation, one site per partition.

Secure aggregation (the cloud's ``federated.secure_aggregation``) needs nothing from the owner:
the train function runs behind Flower's own ``secaggplus_mod`` (installed code, like the rest of
this client), which does the SecAgg+ key exchange and masks the round's trunk update before it
leaves; plain rounds pass it untouched. Before the mod, :func:`check_secagg_request` refuses the
two requests by which a server that deviates from the protocol could unmask one owner. The plan's
settings are checked (``mlcore.federated.plan_errors``) before anything is built or trained.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from mlcore.checkpoint import header
from mlcore.data import ShardRef, shard_refs
from mlcore.federated import (
    SECURE_SUM,
    FederatedPlan,
    clipped_values,
    load_states,
    local_evaluate,
    local_train,
    owner_network,
    plan_errors,
    private_state,
    shared_state,
    trunk_update,
)
from models.keyed import BlockAdapter
from owners.adapters import inverse_setting
from owners.cipher import CipherGeometry, derive_schedule
from owners.errors import OutboxError, OwnerError
from owners.files import private_dir
from owners.keys import OwnerKey, resolve_key
from protocol.shards import Manifest

ADAPTER_INITS = ("key", "learned")
STATE_KEY = "private-adapter"  # with FedBN also the owner's BatchNorm layers
OPTIMIZER_KEY = "private-optimizer"  # schedule run: the owner's AdamW state between rounds
TRUNK_FILE = "trunk.pt"  # the federation's final trunk, next to the adapter: together, the owner's model
SECAGG = RECORD_KEY_CONFIGS  # the record every message of a SecAgg+ round carries
# A SecAgg+ round's training message is in Flower's legacy layout (the SecAgg+ workflow exists only
# for it): the trunk as numbered arrays, their names in the config (orchestrator/server_app.py)
FIT_ARRAYS, FIT_CONFIG, TRUNK_KEYS = "fitins.parameters", "fitins.config", "trunk-keys"


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


def plan_of(config: ConfigRecord) -> FederatedPlan:
    """The server's plan, refused with the reasons when a setting is out of range or malformed."""
    try:
        plan = FederatedPlan.from_json(str(config["plan"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise OwnerError(f"refused the server's plan: not a federated plan ({exc})") from None
    errors = plan_errors(plan)
    if errors:
        raise OwnerError(f"refused the server's plan: {'; '.join(errors)}")
    return plan


def build_model(site: OwnerSite, plan: FederatedPlan, shared: dict[str, torch.Tensor], context: Context):
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
        private = private_state(model, plan.local_batchnorm)
    load_states(model, shared, private, plan.local_batchnorm)
    return model


def numbered_arrays(record: ArrayRecord, names: list[str]) -> dict[str, torch.Tensor]:
    """Flower's legacy layout numbers the arrays ("0", "1", ...); ``names`` are the trunk's names."""
    try:
        arrays = [bytes_to_ndarray(record[key].data) for key in sorted(record, key=int)]
    except ValueError:
        raise OwnerError("the server's secure-aggregation round did not send numbered arrays") from None
    if len(arrays) != len(names):
        raise OwnerError(f"the server sent {len(arrays)} arrays but named {len(names)}")
    return {name: torch.from_numpy(a.copy()) for name, a in zip(names, arrays, strict=True)}


def note_status(site: OwnerSite, server_round: int, phase: str) -> None:
    """<state-dir>/status.json: what this owner's client is doing (for the owner, and tests)."""
    private_dir(site.state_dir)
    tmp = site.state_dir / ".status.json.partial"
    tmp.write_text(json.dumps({"round": server_round, "phase": phase, "time": time.time(), "pid": os.getpid()}))
    tmp.replace(site.state_dir / "status.json")


def handle_train(site: OwnerSite, msg: Message, context: Context) -> Message:
    secure = SECAGG in msg.content.config_records  # the masking stage of a SecAgg+ round
    if secure:
        config = msg.content.config_records[FIT_CONFIG]
        received = numbered_arrays(msg.content.array_records[FIT_ARRAYS], [str(k) for k in config[TRUNK_KEYS]])
    else:
        config = msg.content["config"]
        received = msg.content["arrays"].to_torch_state_dict()
    plan = plan_of(config)
    server_round = int(config["server-round"])
    note_status(site, server_round, "training")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    model = build_model(site, plan, received, context)
    kept = context.state[OPTIMIZER_KEY].to_torch_state_dict() if OPTIMIZER_KEY in context.state else None
    metrics = local_train(model, list(shards_of(site.train, site.key, plan)), plan, server_round,
                          optimizer_state=kept)
    mine = private_state(model, plan.local_batchnorm)  # the adapter, and the BatchNorm layers under FedBN
    context.state[STATE_KEY] = ArrayRecord(mine)
    if "optimizer-state" in metrics:  # schedule run: the owner's AdamW moments, never sent
        context.state[OPTIMIZER_KEY] = ArrayRecord(metrics.pop("optimizer-state"))
    private_dir(site.state_dir)
    tmp = site.state_dir / f".adapter-{site.key.key_id}.pt.partial"
    torch.save({"key_id": site.key.key_id, "state_dict": mine}, tmp)
    tmp.replace(site.state_dir / f"adapter-{site.key.key_id}.pt")
    note_status(site, server_round, "trained")
    summary = {"train_loss": metrics["train_loss"], "train_acc": metrics["train_acc"],
               "num-examples": metrics["num-examples"]}
    if not secure:
        reply = RecordDict({"arrays": ArrayRecord(shared_state(model, plan.local_batchnorm)),  # the trunk only
                            "metrics": MetricRecord(summary)})
        return Message(content=reply, reply_to=msg)
    # The trunk's update, for secaggplus_mod to mask (it empties these arrays before the reply leaves)
    update = trunk_update(shared_state(model, plan.local_batchnorm), received)
    summary["clipped"] = clipped_values(update, metrics["num-examples"])
    if summary["clipped"]:
        note_status(site, server_round, f"trained; secure aggregation clips {summary['clipped']} update values")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([v.numpy() for v in update.values()]),
                    metrics["num-examples"], summary)
    return Message(content=fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def handle_evaluate(site: OwnerSite, msg: Message, context: Context) -> Message:
    plan = plan_of(msg.content["config"])
    if site.test is None:  # Flower counts this reply as a failure; the round goes on without it
        raise OwnerError("this owner has no test split to evaluate on (owner-agent federate --test-data)")
    model = build_model(site, plan, msg.content["arrays"].to_torch_state_dict(), context)
    metrics = local_evaluate(model, list(shards_of(site.test, site.key, plan)), plan)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_final_trunk(site: OwnerSite, msg: Message, context: Context) -> Message:
    """The federation's final trunk: checked against the owner's network, then kept next to the
    owner's adapter (``<state-dir>/trunk.pt``) for ``owner-agent predict --federated``."""
    plan = plan_of(msg.content["config"])
    shared = msg.content["arrays"].to_torch_state_dict()
    load_states(owner_network(plan, site.key.key_id), shared, None, plan.local_batchnorm)  # refuses misfits
    private_dir(site.state_dir)
    tmp = site.state_dir / ".trunk.pt.partial"
    torch.save({**header(plan.task, plan.settings, []), "state_dict": shared}, tmp)
    tmp.replace(site.state_dir / TRUNK_FILE)
    note_status(site, 0, "trunk stored")
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1})}), reply_to=msg)


def check_secagg_request(configs: ConfigRecord, me: int) -> None:
    """Refuse what only a server deviating from SecAgg+ asks: a reconstruction threshold that two
    disjoint groups of owners can each reach (one group hands over an owner's mask seed, the other
    its mask key: together they unmask it), or, in one unmask request, an owner named both alive
    and dropped, or this very owner named dropped."""
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        shares, threshold, owners = (configs.get(k) for k in (Key.SHARE_NUMBER, Key.THRESHOLD, Key.SAMPLE_NUMBER))
        if not all(isinstance(v, int) for v in (shares, threshold, owners)):
            raise OwnerError("refused secure aggregation: the server's setup lacks its numbers")
        if owners < SECURE_SUM.min_owners or threshold < 2 or 2 * threshold <= shares:
            raise OwnerError(f"refused secure aggregation: {owners} owners, threshold {threshold} of {shares} "
                             "shares; it needs 2 owners or more and a threshold above half the shares")
    elif stage == Stage.UNMASK:
        alive, dropped = (set(configs.get(k) or []) for k in (Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST))
        if me in dropped or alive & dropped:
            raise OwnerError("refused a secure-aggregation unmask request naming an owner both alive and "
                             "dropped (or this owner dropped): it would reveal that owner's update")


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the training messages of a SecAgg+ round (they carry its
    record); every other message passes straight to the train function."""
    if msg.metadata.message_type != MessageType.TRAIN or SECAGG not in msg.content.config_records:
        return call_next(msg, context)
    check_secagg_request(msg.content.config_records[SECAGG], msg.metadata.dst_node_id)
    return secaggplus_mod(msg, context, call_next)


def make_client_app(sites: dict[int, OwnerSite]) -> ClientApp:
    """For Flower's simulation: partition-id picks the owner."""
    client = ClientApp()

    @client.train(mods=[secure_aggregation_mod])
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


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    return handle_train(site_from_node_config(dict(context.node_config)), msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(site_from_node_config(dict(context.node_config)), msg, context)


@app.query()
def final_trunk(msg: Message, context: Context) -> Message:
    return handle_final_trunk(site_from_node_config(dict(context.node_config)), msg, context)
