"""The federated mode's server side (Flower ServerApp, Message API): the owners' shared trunk,
averaged each round and stepped by one of Flower's strategies (``federated.server_optimizer``:
FedAvg, FedAvgM, FedAdam, FedYogi).

The server never holds a key-specific tensor: owners send back only ``trunk.*`` arrays
(``mlcore/federated.py``). Owners that fail or vanish mid-round are counted as failures by
Flower and the round aggregates the replies that came; ``min_owners`` is the smallest federation
a round waits for, and ``round_timeout_s`` bounds the wait for one phase.

With ``federated.secure_aggregation``, each round's training is Flower's SecAgg+ workflow
(:func:`secure_train_round`): owners send their trunk *update* masked, and the server learns only
the owners' weighted mean update, never one owner's. Flower 1.41 has SecAgg+ only for its legacy
API (``SecAggPlusWorkflow`` needs a ``LegacyContext``, a legacy strategy and the legacy fit
messages), so that one phase runs in a legacy context made for the round; the rounds, the
evaluation and the final trunk stay on the Message API. The secure sum is the owners' FedAvg
mean; the chosen strategy then takes its server step from it exactly as from plain replies
(:func:`server_step`), so a server optimiser works the same with and without SecAgg+.

``app`` is what ``orchestrator federate`` deploys (it reads ``cluster-config`` from the run
config); ``make_server_app`` builds the same thing for Flower's simulation.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from mlcore import checkpoint as ckpt
from mlcore.federated import SECURE_SUM, FederatedPlan, apply_update, trunk_network, trunk_state, update_keys
from orchestrator.config import ClusterConfig, ConfigError, FederatedConfig, load_config

FINAL_CHECKPOINT = "federated-trunk.pt"
TRUNK_KEYS = "trunk-keys"  # a secure round's config: the names of the numbered arrays (owners/client_app.py)
# SecAgg+ sharing: every owner holds a share of every other owner's two secrets (federations of a
# few owners), and rebuilding one takes round(0.67 x shares), at least 2: more than half of the
# shares, so that no two disjoint groups of owners can each rebuild one secret of the same owner;
# a third of the owners (rounded down) may drop out of a round and it still aggregates.
SHARE_FRACTION, THRESHOLD_FRACTION = 1.0, 0.67


def plan_for(cfg: ClusterConfig) -> FederatedPlan:
    """The plan every owner receives: the task and the ML settings (never the cloud's own)."""
    s, f = cfg.training, cfg.federated
    if s.strategy != "federated":
        raise ConfigError(f"training.strategy is {s.strategy!r}: `orchestrator federate` needs 'federated'")
    return FederatedPlan(cfg.task, s.core(), s.epochs // f.local_epochs * f.rounds_per_epoch, f.local_epochs,
                         f.rounds_per_epoch, f.schedule, f.local_batchnorm)


def make_strategy(f: FederatedConfig, min_owners: int) -> FedAvg:
    """Flower's strategy for ``federated.server_optimizer``, with its hyperparameters from the config."""
    nodes = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": min_owners,
             "min_evaluate_nodes": min_owners, "min_available_nodes": min_owners}
    if f.server_optimizer == "fedavgm":
        return FedAvgM(**nodes, server_learning_rate=f.server_lr, server_momentum=f.server_momentum)
    if f.server_optimizer in ("fedadam", "fedyogi"):
        kind = FedAdam if f.server_optimizer == "fedadam" else FedYogi
        return kind(**nodes, eta=f.server_lr, beta_1=f.server_beta_1, beta_2=f.server_beta_2, tau=f.server_tau)
    if f.server_optimizer == "fedavg" and f.server_lr == 1.0:
        return FedAvg(**nodes)
    return FedAvgM(**nodes, server_learning_rate=f.server_lr)  # FedAvg with a server lr: FedAvgM without momentum


def _payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records (arrays, bytes, strings; 8 per number), not Flower's framing."""
    def size(value) -> int:
        if isinstance(value, (bytes, str)):
            return len(value.encode() if isinstance(value, str) else value)
        return sum(size(v) for v in value) if isinstance(value, list) else 8

    return sum(sum(len(a.data) for a in record.values()) if isinstance(record, ArrayRecord)
               else sum(size(v) for v in record.values()) for record in content.values())


class MeteredGrid(Grid):
    """The ServerApp's grid, metering each round (a message's group id) and phase (train, evaluate):
    wall time from the first message out to the last reply in, and the payload bytes sent to and
    received from owners."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.meters: dict[tuple[str, str], dict] = {}

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every caller here sends one phase of one round per call: its round is the SecAgg+ group
        id, or the Message API's ``server-round`` in the config."""
        messages, started = list(messages), time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if messages:
            first = messages[0]
            config = first.content.config_records.get("config") or {}
            phase = (first.metadata.group_id or str(config.get("server-round", "")),
                     first.metadata.message_type.split(".")[0])
            meter = self.meters.setdefault(phase, {"start": started, "sent": 0, "received": 0})
            meter["sent"] += sum(_payload_bytes(m.content) for m in messages)
            meter["received"] += sum(_payload_bytes(m.content) for m in replies if m.has_content())
            meter["end"] = time.monotonic()
        return replies

    def of_round(self, server_round: int) -> dict:
        phases = {kind: m for (group, kind), m in self.meters.items() if group == str(server_round)}
        if not phases:
            return {}
        train = phases.get(MessageType.TRAIN)
        return {"round_s": round(max(m["end"] for m in phases.values()) - min(m["start"] for m in phases.values()), 3),
                "train_s": round(train["end"] - train["start"], 3) if train else 0.0,
                "sent_MB": round(sum(m["sent"] for m in phases.values()) / 1e6, 3),
                "received_MB": round(sum(m["received"] for m in phases.values()) / 1e6, 3)}


def _round_records(result: Result, meter: MeteredGrid | None = None) -> list[dict]:
    rounds = []
    for rnd in sorted(set(result.train_metrics_clientapp) | set(result.evaluate_metrics_clientapp)):
        train, test = result.train_metrics_clientapp.get(rnd, {}), result.evaluate_metrics_clientapp.get(rnd, {})
        record = {"round": rnd, **{f"train/{k}": v for k, v in dict(train).items()}}
        record.update({f"test/{k}": v for k, v in dict(test).items()})
        record.update(meter.of_round(rnd) if meter else {})
        rounds.append(record)
    return rounds


def hand_out_trunk(grid: Grid, plan: FederatedPlan, arrays: ArrayRecord, timeout_s: float) -> int:
    """Send every connected owner the final trunk, so that it can predict at home with its own
    adapter (which never left it). Returns how many owners stored it."""
    config = ConfigRecord({"plan": plan.to_json()})
    messages = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                        message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    return sum(not reply.has_error() for reply in replies)


def _mean_metrics(results: list[tuple[int, dict]]) -> dict:
    """The owners' train metrics averaged by their examples, as plain FedAvg does; 'clipped' summed."""
    total = sum(n for n, _ in results) or 1
    keys = {k for _, m in results for k in m}
    return {k: (sum(m.get(k, 0) for _, m in results) if k == "clipped"
                else sum(n * m.get(k, 0) for n, m in results) / total) for k in keys}


def server_step(strategy: FedAvg, server_round: int, arrays: ArrayRecord, mean: ArrayRecord, metrics: MetricRecord,
                config: ConfigRecord, grid: Grid) -> ArrayRecord:
    """The strategy's next trunk from the owners' mean trunk ``mean`` (a secure round's sum): handed to
    its own ``aggregate_train`` as the one reply of the round, whose average is itself, after
    ``configure_train`` let it note the round's starting trunk (FedAvgM's and FedAdam's reference)."""
    sent = list(strategy.configure_train(server_round, arrays, config, grid))
    reply = Message(RecordDict({"arrays": mean, "metrics": MetricRecord({**dict(metrics), "num-examples": 1})}),
                    reply_to=sent[0])
    stepped, _ = strategy.aggregate_train(server_round, [reply])
    return stepped


def secure_train_round(grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, min_owners: int,
                       timeout_s: float, log=print) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One round's training with Flower's SecAgg+ workflow: the connected owners (at least
    ``min_owners``, at most ``SECURE_SUM.max_owners``) train from ``arrays`` and send their trunk
    update masked; the workflow unmasks only their weighted sum. Returns the next trunk and the
    owners' mean train metrics, or (None, None) when the round could not aggregate (too few owners
    left to unmask: the trunk stays as it was)."""
    connected = len(list(grid.get_node_ids()))
    node_ids, _ = sample_nodes(grid, min_owners, min(max(connected, min_owners), SECURE_SUM.max_owners))
    state = arrays.to_torch_state_dict()
    names = list(state)
    fit_config = {**dict(config), "server-round": server_round, TRUNK_KEYS: names}
    manager = SimpleClientManager()
    for node in node_ids:
        manager.register(GridClientProxy(node, grid, grid.run.run_id))
    strategy = LegacyFedAvg(fraction_fit=1.0, min_fit_clients=len(node_ids), min_available_clients=len(node_ids),
                            on_fit_config_fn=lambda _: fit_config, fit_metrics_aggregation_fn=_mean_metrics)
    context = LegacyContext(Context(grid.run.run_id, 0, {}, RecordDict(), {}), ServerConfig(1, timeout_s), strategy,
                            manager)
    context.state.array_records[MAIN_PARAMS_RECORD] = sent = arrays
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    SecAggPlusWorkflow(SHARE_FRACTION, THRESHOLD_FRACTION, max_weight=SECURE_SUM.max_weight,
                       clipping_range=SECURE_SUM.clipping_range, quantization_range=SECURE_SUM.quantization_range,
                       modulus_range=SECURE_SUM.modulus_range, timeout=timeout_s)(grid, context)
    aggregate = context.state.array_records[MAIN_PARAMS_RECORD]
    if aggregate is sent:  # the workflow halted before unmasking
        log(f"round {server_round}: secure aggregation halted (too few owners answered); the trunk is unchanged")
        return None, None
    mean = [bytes_to_ndarray(t) for t in arrayrecord_to_parameters(aggregate, keep_input=True).tensors]
    keys = update_keys(state)
    if len(mean) != len(keys):
        raise RuntimeError(f"round {server_round}: the secure sum has {len(mean)} arrays, the trunk {len(keys)}")
    update = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)) for k, a in zip(keys, mean, strict=True)}
    metrics = context.history.metrics_distributed_fit
    return (ArrayRecord(apply_update(state, update)),
            MetricRecord({k: v[-1][1] for k, v in metrics.items()}))


def like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` in ``reference``'s dtypes: a server optimiser computes in float64 (numpy), and a
    trunk that doubles in size on the wire, or an integer counter turned float, helps nobody."""
    ref = reference.to_torch_state_dict()
    return ArrayRecord({k: v.to(ref[k].dtype) for k, v in arrays.to_torch_state_dict().items()})


def run_rounds(grid: Grid, strategy: FedAvg, plan: FederatedPlan, arrays: ArrayRecord, config: ConfigRecord,
               min_owners: int, timeout_s: float, secure: bool, evaluate_every: int, log=print) -> Result:
    """``plan.rounds`` rounds of the strategy (Flower's ``Strategy.start``, with each round's training
    through SecAgg+ when ``secure``), the owners evaluating every ``evaluate_every`` local epochs and
    after the last round."""
    result, evaluate_rounds = Result(arrays=arrays), evaluate_every * plan.rounds_per_epoch
    for rnd in range(1, plan.rounds + 1):
        if secure:
            mean, metrics = secure_train_round(grid, rnd, result.arrays, config, min_owners, timeout_s, log)
            trained = None if mean is None else server_step(strategy, rnd, result.arrays, mean, metrics, config, grid)
        else:
            messages = strategy.configure_train(rnd, result.arrays, config, grid)
            trained, metrics = strategy.aggregate_train(rnd, grid.send_and_receive(messages, timeout=timeout_s))
        if trained is not None:
            result.arrays, result.train_metrics_clientapp[rnd] = like(trained, arrays), metrics
        if rnd % evaluate_rounds and rnd != plan.rounds:
            continue
        messages = strategy.configure_evaluate(rnd, result.arrays, config, grid)
        evaluated = strategy.aggregate_evaluate(rnd, grid.send_and_receive(messages, timeout=timeout_s))
        if evaluated is not None:
            result.evaluate_metrics_clientapp[rnd] = evaluated
    return result


def run_federated(grid: Grid, plan: FederatedPlan, min_owners: int, round_timeout_s: float, out_dir: Path,
                  log=print, secure: bool = False, federated: FederatedConfig | None = None) -> Path:
    """``plan.rounds`` rounds of ``federated.server_optimizer`` (``secure``: over SecAgg+); writes
    metrics.jsonl per round (with each round's wall time and payload bytes) and the trunk checkpoint."""
    f = federated or FederatedConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = MeteredGrid(grid)
    config = ConfigRecord({"plan": plan.to_json()})
    strategy = make_strategy(f, min_owners)
    started = time.time()
    initial = ArrayRecord(trunk_state(trunk_network(plan), plan.local_batchnorm))
    result = run_rounds(grid, strategy, plan, initial, config, min_owners, round_timeout_s, secure, f.evaluate_every,
                        log)
    rounds = _round_records(result, grid)
    with open(out_dir / "metrics.jsonl", "a") as fh:
        for record in rounds:
            fh.write(json.dumps(record) + "\n")
    path = out_dir / FINAL_CHECKPOINT
    head = ckpt.header(plan.task, plan.settings, [], rounds=rounds, seconds=time.time() - started,
                       secure_aggregation=secure, server_optimizer=f.server_optimizer,
                       local_batchnorm=plan.local_batchnorm)
    torch.save({**head, "state_dict": result.arrays.to_torch_state_dict()}, path)
    stored = hand_out_trunk(grid, plan, result.arrays, round_timeout_s)
    log(f"federated training done ({f.server_optimizer}{', secure aggregation' if secure else ''}): {len(rounds)} "
        f"rounds in {time.time() - started:.0f} s; trunk in {path}; {stored} owner(s) stored it to predict at home")
    return path


def make_server_app(plan: FederatedPlan, min_owners: int, round_timeout_s: float, out_dir: Path,
                    secure: bool = False, federated: FederatedConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated(grid, plan, min_owners, round_timeout_s, out_dir, secure=secure, federated=federated)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployed by ``orchestrator federate``: everything comes from the cluster config."""
    cfg = load_config(Path(str(context.run_config["cluster-config"])))
    f = cfg.federated
    run_federated(grid, plan_for(cfg), f.min_owners, f.round_timeout_s, Path(str(context.run_config["out-dir"])),
                  secure=f.secure_aggregation, federated=f)
