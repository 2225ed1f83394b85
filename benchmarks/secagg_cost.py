"""Secure aggregation's cost per round: plain FedAvg against SecAgg+, same owners, same data.

    python -m benchmarks.secagg_cost [--mode loopback|in-process] [--owners 2 3] [--rounds 3] \
        [--train-per-class 20] [--data examples/cifar10-sample/train] [--json out.json]

``loopback`` (default) runs the product as deployed, on 127.0.0.1: ``orchestrator federate``
(ingest, Flower SuperLink, ServerApp) and one ``owner-agent federate`` per owner (its own key, its
own slice of ``--data``, a Flower SuperNode running the installed ClientApp), once per number of
owners and mode (plain FedAvg, ``federated.secure_aggregation: true``). The ServerApp meters
every round (``metrics.jsonl``): wall time from the round's first message out to its last reply
in, the training phase alone (plain: one exchange; SecAgg+: its four), and the payload bytes it
sent to and received from the owners. ``in-process`` runs the same ServerApp and the owners' same
ClientApp in this one process (:class:`InProcessGrid`: no processes, no network, no polling; the
owners train one after another): the compute of the protocol itself, and how far the secure
trunk ends from the plain one. Every run trains the same model on the same slices with the same
seed, so the difference between the modes is the cost of secure aggregation.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from flwr.app import Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid

from benchmarks._common import ROOT, report

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def slice_data(data: Path, out: Path, index: int, train: int, test: int, classes: list[str]) -> tuple[Path, Path]:
    """Owner ``index``'s own images: per class, ``train`` then ``test`` files no other owner gets."""
    for cls in classes:
        files = sorted((data / cls).iterdir())[index * (train + test):(index + 1) * (train + test)]
        if len(files) < train + test:
            raise SystemExit(f"{data / cls}: too few images for owner {index} ({train} + {test} needed)")
        for split, chosen in (("train", files[:train]), ("test", files[train:])):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (out / split / cls / f.name).symlink_to(f.resolve())
    return out / "train", out / "test"


class LoopbackFederation:
    """``orchestrator federate`` and ``owners`` × ``owner-agent federate`` on 127.0.0.1, in ``work``."""

    def __init__(self, work: Path, owners: list[str], data: Path, secure: bool, rounds: int = 3,
                 train_per_class: int = 20, test_per_class: int = 4, classes: list[str] = CLASSES,
                 model: str = "convmixer_256_8_p4_k9", batch_size: int = 32, min_owners: int = 2) -> None:
        from orchestrator.auth import token_sha256
        from protocol.net import free_port

        self.work, self.owners, self.procs = work, owners, {}
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ingest_port, self.flower_port = free_port(), free_port()
        self.tokens = {o: f"secagg-cost-token-{o}" for o in owners}
        config = {
            "name": "secagg-cost",
            "task": {"classes": classes},
            "ingest": {"listen": f"127.0.0.1:{self.ingest_port}", "store": str(work / "store"),
                       "insecure_loopback": True,
                       "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in self.tokens.items()]},
            "training": {"strategy": "federated", "model": model, "epochs": rounds, "batch_size": batch_size,
                         "lr": 0.003},
            "federated": {"listen": f"127.0.0.1:{self.flower_port}", "local_epochs": 1, "min_owners": min_owners,
                          "rounds_per_epoch": 1, "schedule": "round", "local_batchnorm": False,  # as measured
                          "round_timeout_s": 600, "secure_aggregation": secure},
        }
        self.config = config
        (work / "cluster.yaml").write_text(yaml.safe_dump(config))
        self.slices = {o: slice_data(data, work / f"data-{o}", i, train_per_class, test_per_class, classes)
                       for i, o in enumerate(owners)}

    def _spawn(self, name: str, args: list[str], env: dict) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=open(self.logs / f"{name}.out", "wb"),  # noqa: SIM115 - for the process's lifetime
            stderr=open(self.logs / f"{name}.err", "wb"), start_new_session=True)  # noqa: SIM115 - for the process's lifetime

    def home(self, owner: str) -> Path:
        return self.work / f"home-{owner}"

    def start(self) -> None:
        self._spawn("orchestrator", ["orchestrator.cli", "federate", str(self.work / "cluster.yaml")], ENV)
        for owner in self.owners:
            env = {**ENV, "OWNER_AGENT_HOME": str(self.home(owner))}
            subprocess.run([sys.executable, "-m", "owners.cli", "keygen", "mine"], cwd=ROOT, env=env, check=True,
                           capture_output=True, timeout=120)
            token_file = self.work / f"{owner}.token"
            token_file.write_text(self.tokens[owner])
            token_file.chmod(0o600)
            train, test = self.slices[owner]
            self._spawn(owner, ["owners.cli", "federate", "--key", "mine", "--data", str(train), "--test-data",
                                str(test), "--server", f"127.0.0.1:{self.ingest_port}", "--token-file",
                                str(token_file), "--flower", f"127.0.0.1:{self.flower_port}", "--insecure",
                                "--no-progress"], env)

    def status(self, owner: str) -> dict | None:
        """The owner's ``status.json`` (round and phase of its client), once it has one."""
        path = self.home(owner) / "federated" / "secagg-cost" / owner / "status.json"
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
        return None

    def kill(self, owner: str) -> None:
        """SIGKILL the owner's agent, SuperNode and ClientApp (one process group)."""
        os.killpg(self.procs[owner].pid, signal.SIGKILL)
        self.procs[owner].wait()

    def wait(self, timeout_s: float) -> dict:
        """Wait for the orchestrator; returns its result line (trunk_checkpoint, metrics)."""
        code = self.procs["orchestrator"].wait(timeout_s)
        err = (self.logs / "orchestrator.err").read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"orchestrator federate exited with {code}:\n{err[-3000:]}")
        return json.loads((self.logs / "orchestrator.out").read_text())

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


class InProcessGrid(Grid):
    """The SuperLink and the owners' SuperNodes in one process, for a ServerApp's ``grid``: each
    message is copied (as if sent) to its node's ClientApp, with the node's persistent context (set
    ``TaskIdentity`` first: Flower stamps messages with it). Every reply the server gets is kept in
    ``received``. ``drop``: node -> the SecAgg+ stage from which that node answers nothing (the
    grid replies an error, as the SuperLink does for a vanished node); ``unlist``: a dropped node is
    no longer listed after its first failure (the SuperLink noticed it)."""

    def __init__(self, apps: dict[int, tuple], drop: dict[int, str] | None = None, unlist: bool = False) -> None:
        self.nodes = apps  # node id -> (ClientApp, Context)
        self.drop, self.gone, self.unlist = dict(drop or {}), set(), unlist
        self.received: list[Message] = []
        self.ids = itertools.count(1)

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return type("Run", (), {"run_id": 7})()

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return [n for n in self.nodes if not (self.unlist and n in self.gone)]

    def push_messages(self, messages):
        raise TypeError("this in-process grid answers through send_and_receive only (all SecAggPlusWorkflow uses)")

    def pull_messages(self, message_ids):
        raise TypeError("this in-process grid answers through send_and_receive only (all SecAggPlusWorkflow uses)")

    def _dropped(self, node: int, msg: Message) -> bool:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if node in self.drop and (stage is None or Stage.all().index(stage) >= Stage.all().index(self.drop[node])):
            self.gone.add(node)
        return node in self.gone

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            delivered = copy.deepcopy(msg)
            delivered.metadata.__dict__["_message_id"] = f"m{next(self.ids)}"
            if self._dropped(node, msg):
                reply = Message(Error(code=0, reason="node offline"), reply_to=delivered)
            else:
                app, context = self.nodes[node]
                try:
                    reply = app(delivered, context)
                except Exception as exc:
                    reply = Message(Error(code=1, reason=repr(exc)), reply_to=delivered)
            replies.append(copy.deepcopy(reply))
        self.received += replies
        return replies


def measure(work: Path, owners: int, secure: bool, args: argparse.Namespace) -> dict:
    names = [f"owner-{i}" for i in range(owners)]
    fed = LoopbackFederation(work, names, Path(args.data), secure, args.rounds, args.train_per_class,
                             args.test_per_class, batch_size=args.batch_size, min_owners=owners)
    started = time.monotonic()
    try:
        fed.start()
        result = fed.wait(args.timeout)
    finally:
        fed.stop()
    rounds = [json.loads(line) for line in Path(result["metrics"]).read_text().splitlines()]
    return {"owners": owners, "secure": secure, "rounds": rounds, "total_s": time.monotonic() - started,
            "config": fed.config}


def measure_in_process(work: Path, owners: int, secure: bool, args: argparse.Namespace) -> dict:
    import torch
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from mlcore.federated import FederatedPlan
    from mlcore.settings import TrainSettings
    from orchestrator.server_app import FINAL_CHECKPOINT, run_federated
    from owners.client_app import OwnerSite, make_client_app
    from owners.encrypt import EncryptSettings, encrypt_folder
    from owners.keys import OwnerKey
    from protocol.task import Task

    task = Task(tuple(CLASSES))
    sites = {}
    for i in range(owners):
        key = OwnerKey(f"owner{i}", bytes([i + 1]) * 32)
        train, test = slice_data(Path(args.data), work / f"data-{i}", i, args.train_per_class, args.test_per_class,
                                 CLASSES)
        for split, folder in (("train", train), ("test", test)):
            encrypt_folder(folder, work / f"outbox-{i}" / split, key, EncryptSettings(task=task, split=split),
                           progress=False)
        sites[i] = OwnerSite(work / f"outbox-{i}" / "train", work / f"outbox-{i}" / "test", key, work / f"state-{i}")
    app = make_client_app(sites)
    grid = InProcessGrid({100 + i: (app, Context(7, 100 + i, {"partition-id": i}, RecordDict(), {}))
                          for i in range(owners)})
    settings = TrainSettings(strategy="federated", model="convmixer_256_8_p4_k9", epochs=args.rounds,
                             batch_size=args.batch_size, lr=0.003)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    started = time.monotonic()
    run_federated(grid, FederatedPlan(task, settings, args.rounds, 1), owners, args.timeout, work / "result",
                  log=lambda *_: None, secure=secure)
    payload = torch.load(work / "result" / FINAL_CHECKPOINT, weights_only=False)
    return {"owners": owners, "secure": secure, "rounds": payload["rounds"], "total_s": time.monotonic() - started,
            "trunk": payload["state_dict"], "config": {"training": {"model": settings.model,
                                                                    "batch_size": settings.batch_size}}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("loopback", "in-process"), default="loopback")
    ap.add_argument("--owners", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default=str(ROOT / "examples" / "cifar10-sample" / "train"),
                    help="class folders (CIFAR-10's ten classes); each owner takes its own slice")
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--test-per-class", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per federation")
    ap.add_argument("--json", help="also write the table and every round's numbers here")
    args = ap.parse_args(argv)
    run_one = measure if args.mode == "loopback" else measure_in_process
    runs = []
    with tempfile.TemporaryDirectory(prefix="secagg-cost-") as tmp:
        for owners in args.owners:
            for secure in (False, True):
                runs.append(run_one(Path(tmp) / f"{owners}-{'secagg' if secure else 'plain'}", owners, secure, args))
                print(f"{owners} owners, {'SecAgg+' if secure else 'plain FedAvg'}: " + ", ".join(
                    f"round {x['round']} {x['round_s']:.1f} s" for x in runs[-1]["rounds"]), file=sys.stderr)
    rows = []
    for r in runs:
        rs = r["rounds"]
        plain = next(p for p in runs if p["owners"] == r["owners"] and not p["secure"])

        def med(key, rounds=rs):
            return statistics.median(x[key] for x in rounds)

        drift = max((r["trunk"][k].double() - plain["trunk"][k].double()).abs().max().item()
                    for k in r["trunk"] if r["trunk"][k].is_floating_point()) if "trunk" in r else None
        rows.append([r["owners"], "SecAgg+" if r["secure"] else "plain FedAvg", len(rs), med("round_s"),
                     med("train_s"), med("train_s") - med("train_s", plain["rounds"]), med("sent_MB"),
                     med("received_MB"), sum("train/train_loss" in x for x in rs),
                     rs[-1].get("test/test_acc", float("nan"))] + ([f"{drift:.1e}"] if drift is not None else []))
    cfg = runs[0]["config"]
    where = ("owners, SuperLink and ServerApp share this machine (127.0.0.1)" if args.mode == "loopback" else
             "ServerApp and owners' ClientApps in one process, owners training one after another")
    notes = [f"Model {cfg['training']['model']}, batch {cfg['training']['batch_size']}, 1 local epoch per round, "
             f"{args.train_per_class} train + {args.test_per_class} test images per class and owner from {args.data}; "
             f"{where}.",
             "Per round, median over the rounds: round = first message out to last reply in (training and "
             "evaluation); train = the training phase alone; MB = payload bytes (arrays, keys, shares, masked "
             "vectors) the ServerApp sent to / received from all owners in the round."]
    header = ["owners", "mode", "rounds", "round s", "train s", "train s over plain", "sent MB", "received MB",
              "rounds aggregated", "final test acc"]
    if args.mode == "in-process":
        header.append("max |trunk - plain trunk|")
        notes.append("max |trunk - plain trunk|: largest difference of any trunk entry after the last round from "
                     "the plain FedAvg run's (same data, same seeds): the quantization noise of the secure sum.")
    for r in runs:
        r.pop("trunk", None)
    report(f"Secure aggregation: cost per round ({args.mode})", header, rows, notes, args.json, {"runs": runs})


if __name__ == "__main__":
    main()
