"""The federated mode's server side (Flower ServerApp, Message API): FedAvg over the shared trunk.

The server never holds a key-specific tensor: owners send back only ``trunk.*`` arrays
(``mlcore/federated.py``). Owners that fail or vanish mid-round are counted as failures by
Flower and the round aggregates the replies that came; ``min_owners`` is the smallest federation
a round waits for, and ``round_timeout_s`` bounds the wait for one phase.

``app`` is what ``orchestrator federate`` deploys (it reads ``cluster-config`` from the run
config); ``make_server_app`` builds the same thing for Flower's simulation.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from mlcore import checkpoint as ckpt
from mlcore.federated import FederatedPlan, trunk_network, trunk_state
from orchestrator.config import ClusterConfig, ConfigError, load_config

FINAL_CHECKPOINT = "federated-trunk.pt"


def plan_for(cfg: ClusterConfig) -> FederatedPlan:
    """The plan every owner receives: the task and the ML settings (never the cloud's own)."""
    s, f = cfg.training, cfg.federated
    if s.strategy != "federated":
        raise ConfigError(f"training.strategy is {s.strategy!r}: `orchestrator federate` needs 'federated'")
    return FederatedPlan(cfg.task, s.core(), s.epochs // f.local_epochs, f.local_epochs)


def _round_records(result) -> list[dict]:
    rounds = []
    for rnd in sorted(result.train_metrics_clientapp):
        record = {"round": rnd, **{f"train/{k}": v for k, v in dict(result.train_metrics_clientapp[rnd]).items()}}
        record.update({f"test/{k}": v for k, v in dict(result.evaluate_metrics_clientapp.get(rnd, {})).items()})
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


def run_federated(grid: Grid, plan: FederatedPlan, min_owners: int, round_timeout_s: float, out_dir: Path,
                  log=print) -> Path:
    """FedAvg for ``plan.rounds`` rounds; writes metrics.jsonl per round and the trunk checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = ConfigRecord({"plan": plan.to_json()})
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_owners,
                      min_evaluate_nodes=min_owners, min_available_nodes=min_owners)
    started = time.time()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(trunk_state(trunk_network(plan))),
                            num_rounds=plan.rounds, timeout=round_timeout_s, train_config=config,
                            evaluate_config=config)
    rounds = _round_records(result)
    with open(out_dir / "metrics.jsonl", "a") as f:
        for record in rounds:
            f.write(json.dumps(record) + "\n")
    path = out_dir / FINAL_CHECKPOINT
    head = ckpt.header(plan.task, plan.settings, [], rounds=rounds, seconds=time.time() - started)
    torch.save({**head, "state_dict": result.arrays.to_torch_state_dict()}, path)
    stored = hand_out_trunk(grid, plan, result.arrays, round_timeout_s)
    log(f"federated training done: {len(rounds)} rounds in {time.time() - started:.0f} s; trunk in {path}; "
        f"{stored} owner(s) stored it to predict at home")
    return path


def make_server_app(plan: FederatedPlan, min_owners: int, round_timeout_s: float, out_dir: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federated(grid, plan, min_owners, round_timeout_s, out_dir)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployed by ``orchestrator federate``: everything comes from the cluster config."""
    cfg = load_config(Path(str(context.run_config["cluster-config"])))
    f = cfg.federated
    run_federated(grid, plan_for(cfg), f.min_owners, f.round_timeout_s, Path(str(context.run_config["out-dir"])))
