"""Multi-key experiment runner: one model from K owners' data, each owner with its own key.

    python -m benchmarks.multikey benchmarks/multikey-cpu.yaml

For every K in ``owners`` and every partition (IID, or non-IID with Dirichlet(alpha) class
proportions per owner), it splits a class-balanced subset of the data among K owners, encrypts
each owner's share with the owner pipeline, trains every strategy at an equal budget with the
product's Ray Train loop, and evaluates every owner on the held-out test images encrypted under
its own key, plus the same images under a key no owner has ("wrong key"). Writes a markdown
table, a plot and a JSON record (config, code version, every number) to ``out``.

Strategies measured: plain (no encryption), shared-key (all owners, one key), pooled (a key per
owner, one model, no key information), key-adapters (a key per owner, a per-key BlockAdapter in
front of a shared trunk, all trained in the cloud), federated (Flower simulation on Ray: each owner
trains its private adapter and the shared trunk on its own data, FedAvg over the trunk; rounds x
local epochs = epochs), and federated-shared-key (the same with every owner under one key and
adapters starting at identity: FedAvg's own cost, without the keys).

Wrong key: the test images under a key no owner has. A keyed model refuses that key id, so it is
also measured the way an attacker would try: presented under owner0's key id. Key leakage: for
keyed models, how much of the owners' relative schedules the adapters reveal (benchmarks/leakage.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import ROOT, machine_facts
from benchmarks.leakage import relative_order_from_positions, relative_recovery
from mlcore.checkpoint import code_version, load_checkpoint, model_from_checkpoint
from mlcore.data import EncodedImages, ShardRef, outbox_refs
from mlcore.loop import evaluate
from models import Network
from models.keyed import TokenAdapter
from orchestrator.config import FederatedConfig, TrainingConfig, load_dataclass
from orchestrator.launch import evaluate_checkpoint
from orchestrator.training import TrainJob, run_training
from owners.cipher import CipherGeometry, derive_schedule
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.task import Task

STRATEGIES = ("plain", "shared-key", "pooled", "key-adapters", "federated", "federated-shared-key", "per-image-keys")

PRODUCT_FEDERATED = FederatedConfig()


@dataclass(frozen=True)
class ExperimentConfig:
    data: Path = ROOT.parent / "shared/data/cifar10-jpeg/train"  # DIR/<class>/*.jpg
    train_per_class: int = 500  # images per class shared among the owners
    test_per_class: int = 100  # held out: the last images of each class, never trained on
    owners: tuple[int, ...] = (1, 4, 8)  # K values
    partitions: tuple[str, ...] = ("iid", "dirichlet")  # how the training images are split
    dirichlet_alpha: float = 0.5  # smaller: more skewed class mixes per owner
    strategies: tuple[str, ...] = STRATEGIES
    model: str = "convmixer_256_8_p4_k9"
    per_image_model: str = "invariant_128_6_p2_k5_mean"  # per-image-keys: a network invariant to every key
    per_image_lr: float = 0.01  # per-image-keys: its peak learning rate
    per_image_block: int = 16  # per-image-keys: EtC block (8: 16 blocks per 32x32 image, JPEG chroma 4:4:4)
    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.01
    adapter_lr_scale: float = 10.0  # key-adapters: the adapters' lr relative to lr
    federated_adapter_init: str = "key"  # key: owners start their adapter at their key's inverse | learned
    local_epochs: int = 1  # federated: epochs per round
    federated_split_batch: bool = False  # federated: each owner's batch = batch_size / K, so FedAvg takes as
    # many sequential steps as centralised training at equal epochs (4 owners x 16 ~ one batch of 64)
    # federated: the product's convergence options and their defaults (orchestrator/config.py FederatedConfig;
    # benchmarks/multikey-cpu.yaml pins the mode's first version, which its table measured)
    rounds_per_epoch: int = PRODUCT_FEDERATED.rounds_per_epoch
    federated_schedule: str = PRODUCT_FEDERATED.schedule  # federated.schedule: round | run
    local_batchnorm: bool = PRODUCT_FEDERATED.local_batchnorm  # FedBN
    server_optimizer: str = PRODUCT_FEDERATED.server_optimizer
    server_lr: float = PRODUCT_FEDERATED.server_lr
    server_momentum: float = PRODUCT_FEDERATED.server_momentum
    server_beta_1: float = PRODUCT_FEDERATED.server_beta_1
    server_beta_2: float = PRODUCT_FEDERATED.server_beta_2
    server_tau: float = PRODUCT_FEDERATED.server_tau
    evaluate_every: int = 1000  # epochs: owners evaluate only after the last round (the runner evaluates them)
    only_cells: tuple[str, ...] = ()  # e.g. ["k8-dirichlet"]: run just these K/partition cells (empty: all)
    seed: int = 0
    out: Path = ROOT / "results" / "multikey"


def key_for(name: str, seed: int) -> OwnerKey:
    """Deterministic experiment keys (never used for real data)."""
    return OwnerKey(name, hashlib.sha256(f"multikey-experiment/{seed}/{name}".encode()).digest())


def split_owners(files: dict[str, list[Path]], k: int, partition: str, alpha: float,
                 rng) -> list[dict[str, list[Path]]]:
    """Per owner: class -> files. IID: equal shares; dirichlet: per-class shares ~ Dir(alpha)."""
    shares = [{c: [] for c in files} for _ in range(k)]
    for cls, paths in files.items():
        paths = list(paths)
        rng.shuffle(paths)
        if partition == "iid":
            weights = np.full(k, 1 / k)
        elif partition == "dirichlet":
            weights = np.random.default_rng(rng.randrange(2**32)).dirichlet([alpha] * k)
        else:
            raise ValueError(f"unknown partition {partition!r}: iid or dirichlet")
        cuts = np.round(np.cumsum(weights) * len(paths)).astype(int)
        for owner, (lo, hi) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
            shares[owner][cls] = paths[lo:hi]
    return shares


def materialise(share: dict[str, list[Path]], folder: Path) -> None:
    for cls, paths in share.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for p in paths:
            (folder / cls / p.name).symlink_to(p)


def prepare(folder: Path, out: Path, key: OwnerKey | None, task: Task, split: str, owner: str) -> tuple[ShardRef, ...]:
    encrypt_folder(folder, out, key, EncryptSettings(task=task, split=split, max_bad_fraction=1.0), progress=False)
    return outbox_refs(out, owner)


def run_cell(cfg: ExperimentConfig, k: int, partition: str, strategy: str, shares, test_dir: Path,
             classes: tuple[str, ...], work: Path, geometry: dict | None = None) -> dict:
    """Train one strategy on one split; evaluate every owner and the wrong key. ``geometry``: Task
    fields (scheme, image_size, block_size, chroma) replacing the default colour 32x32 block 16."""
    tag = f"k{k}-{partition}-{strategy}"
    shared = strategy in ("shared-key", "federated-shared-key")
    per_image = strategy == "per-image-keys"  # no owner keys: every image, test ones too, under its own
    keys = {f"owner{i}": (None if strategy == "plain" or per_image else
                          key_for("shared" if shared else f"owner{i}", cfg.seed)) for i in range(k)}
    fields = {"scheme": "plain" if strategy == "plain" else "color", **(geometry or {})}
    if per_image:
        block = cfg.per_image_block
        fields = {"block_size": block, "chroma": "420" if block % 16 == 0 else "444", **fields, "key_mode": "per-image"}
    task = Task(classes, **fields)
    train, test = (), ()
    for i, share in enumerate(shares):
        owner = f"owner{i}"
        if not any(share.values()):
            continue  # a Dirichlet split can leave an owner without images
        materialise(share, work / tag / owner / "imgs")
        train += prepare(work / tag / owner / "imgs", work / tag / owner / "train", keys[owner], task, "train", owner)
    for owner in sorted({r.owner for r in train}):
        test += prepare(test_dir, work / tag / owner / "test", keys[owner], task, "test", owner)
    if strategy != "plain":
        # per-image-keys: the same images under yet other fresh keys (the model must not care)
        test += prepare(test_dir, work / tag / "wrong-key", None if per_image else key_for("wrong", cfg.seed), task,
                        "test", "wrong-key")
    settings = TrainingConfig(model=cfg.per_image_model if per_image else cfg.model, epochs=cfg.epochs,
                              batch_size=cfg.batch_size, lr=cfg.per_image_lr if per_image else cfg.lr,
                              seed=cfg.seed, strategy=strategy, adapter_lr_scale=cfg.adapter_lr_scale)
    job = TrainJob(tag, task, train, test, settings, str(work / tag / "logs"), code_version())
    if strategy in ("federated", "federated-shared-key"):
        return federated_cell(cfg, k, partition, job, keys, work / tag, strategy)
    started = time.perf_counter()
    checkpoint = run_training(job, work / "ray")
    minutes = (time.perf_counter() - started) / 60
    rows = evaluate_checkpoint(checkpoint, job)
    owners = [r for r in rows if r["owner"] != "wrong-key"]
    wrong = [r for r in rows if r["owner"] == "wrong-key"]
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    result = {"k": k, "partition": partition, "strategy": strategy, "minutes": minutes,
              "accuracy": float(np.mean([r["accuracy"] for r in owners])),
              "per_owner": {r["owner"]: r["accuracy"] for r in owners},
              "wrong_key_accuracy": wrong[0]["accuracy"] if wrong else None,
              "wrong_key_refused": bool(wrong and wrong[0]["refused"]),
              "train_images": sum(r.images for r in train), "parameters": model.parameter_counts(),
              "leakage": None}
    if model.key_ids:  # a per-key input stage: it refuses the wrong key, so try the attacker's way
        result["wrong_key_accuracy"] = stolen_key_id_accuracy(model, job, test)
        result["leakage"] = adapter_leakage(model, job.task, keys)
    return result


def federated_cell(cfg: ExperimentConfig, k: int, partition: str, job: TrainJob, keys: dict, folder: Path,
                   strategy: str) -> dict:
    """Flower simulation on Ray; then each owner's accuracy with its own adapter and the final trunk."""
    import ray
    import torch

    from mlcore.federated import FederatedPlan, owner_model
    from orchestrator.federate import simulate
    from owners.client_app import OwnerSite, make_client_app

    owners = sorted({r.owner for r in job.train})
    # the plan's strategy is "federated" for both cells: the trunk checkpoint then rebuilds as a keyed network
    settings = dataclasses.replace(job.settings.core(), strategy="federated")
    if cfg.federated_split_batch:
        settings = dataclasses.replace(settings, batch_size=max(1, cfg.batch_size // len(owners)))
    federated = FederatedConfig(local_epochs=cfg.local_epochs, rounds_per_epoch=cfg.rounds_per_epoch,
                                schedule=cfg.federated_schedule, local_batchnorm=cfg.local_batchnorm,
                                server_optimizer=cfg.server_optimizer, server_lr=cfg.server_lr,
                                server_momentum=cfg.server_momentum, server_beta_1=cfg.server_beta_1,
                                server_beta_2=cfg.server_beta_2, server_tau=cfg.server_tau,
                                evaluate_every=cfg.evaluate_every)
    plan = FederatedPlan(job.task, settings, cfg.epochs // cfg.local_epochs * cfg.rounds_per_epoch, cfg.local_epochs,
                         cfg.rounds_per_epoch, cfg.federated_schedule, cfg.local_batchnorm)
    # the one-key FedAvg baseline knows nothing of the key: its adapters start at identity
    init = "learned" if strategy == "federated-shared-key" else cfg.federated_adapter_init
    sites = {i: OwnerSite(folder / owner / "train", folder / owner / "test", keys[owner], folder / owner / "state",
                          init) for i, owner in enumerate(owners)}
    ray.shutdown()  # Flower's simulation starts (and at the end stops) Ray itself
    started = time.perf_counter()
    checkpoint = simulate(plan, make_client_app(sites), len(owners), len(owners), folder / "server",
                          federated=federated)
    minutes = (time.perf_counter() - started) / 60
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    trunk = torch.load(checkpoint, map_location="cpu", weights_only=False)
    accuracy, models = {}, {}
    for owner in owners:
        adapter = torch.load(folder / owner / "state" / f"adapter-{keys[owner].key_id}.pt", weights_only=False)
        models[owner] = owner_model(trunk, adapter)
        shards = [r for r in job.test if r.owner == owner]
        accuracy[owner] = evaluate(models[owner], EncodedImages(shards, [adapter["key_id"]]), [adapter["key_id"]],
                                   job.settings, torch.device("cpu"))["test_acc"]
    wrong = [r for r in job.test if r.owner == "wrong-key"]
    victim = keys[owners[0]].key_id
    wrong_acc = evaluate(models[owners[0]], EncodedImages(wrong, [wrong[0].key_id]), [wrong[0].key_id], job.settings,
                         torch.device("cpu"), route={wrong[0].key_id: victim})["test_acc"]
    counts = models[owners[0]].parameter_counts()
    return {"k": k, "partition": partition, "strategy": strategy, "minutes": minutes,
            "accuracy": float(np.mean(list(accuracy.values()))), "per_owner": accuracy,
            "wrong_key_accuracy": wrong_acc, "wrong_key_refused": True,
            "train_images": sum(r.images for r in job.train),
            "parameters": {"total": counts["shared"] + len(owners) * counts["per_key"], "shared": counts["shared"],
                           "per_key": counts["per_key"]},
            "leakage": None, "adapter_init": init, "owner_batch_size": settings.batch_size,
            "rounds": trunk["rounds"], "federated": dataclasses.asdict(federated)}


def stolen_key_id_accuracy(model: Network, job: TrainJob, test) -> float:
    """Wrong-key images presented under owner0's key id (the adapter an attacker would borrow)."""
    import torch

    shards = [r for r in test if r.owner == "wrong-key"]
    key = shards[0].key_id
    victim = next(r.key_id for r in job.train if r.owner == "owner0")
    out = evaluate(model, EncodedImages(shards, [key]), [key], job.settings, torch.device("cpu"), route={key: victim})
    return out["test_acc"]


def adapter_leakage(model: Network, task: Task, keys: dict) -> dict:
    """relative_recovery of the adapters against the owners' true schedules (known here only)."""
    geometry = CipherGeometry.for_task(task)
    by_id = {key.key_id: key for key in keys.values() if key is not None}
    schedules = [derive_schedule(by_id[kid].secret, geometry) for kid in model.key_ids]
    if isinstance(model.adapters[0], TokenAdapter):
        return relative_order_from_positions(list(model.adapters), schedules)
    return relative_recovery(list(model.adapters), schedules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (fields of ExperimentConfig)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one field of the YAML (VALUE read as YAML), e.g. --set server_lr=2")
    args = parser.parse_args()
    cfg = with_overrides(load_dataclass(ExperimentConfig, args.config), args.set)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no telemetry: Flower reads this on first import
    unknown = set(cfg.strategies) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"strategies not available yet: {', '.join(sorted(unknown))} (have {', '.join(STRATEGIES)})")

    import ray

    rng = random.Random(cfg.seed)
    classes = tuple(sorted(p.name for p in Path(cfg.data).iterdir() if p.is_dir()))
    all_files = {c: sorted((Path(cfg.data) / c).iterdir()) for c in classes}
    train_files = {c: f[:cfg.train_per_class] for c, f in all_files.items()}
    work = Path(tempfile.mkdtemp(prefix="multikey-"))
    test_dir = work / "test-imgs"
    materialise({c: f[-cfg.test_per_class:] for c, f in all_files.items()}, test_dir)
    results = []
    version = code_version()  # the commit this process loaded its code from (HEAD may move while it runs)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for k in cfg.owners:
            for partition in (cfg.partitions if k > 1 else cfg.partitions[:1]):
                shares = split_owners(train_files, k, partition, cfg.dirichlet_alpha, rng)
                if cfg.only_cells and f"k{k}-{partition}" not in cfg.only_cells:
                    continue  # the split was still drawn: other cells keep the same owners' data
                for strategy in cfg.strategies:
                    if k == 1 and strategy == "pooled":
                        continue  # one owner: pooled is shared-key
                    results.append(run_cell(cfg, k, partition, strategy, shares, test_dir, classes, work))
                    r = results[-1]
                    r.update(code_version=version, config=_jsonable(cfg))
                    write_outputs(cfg, [r], quiet=True)  # after every cell: an interrupted run keeps its cells
                    wrong = r["wrong_key_accuracy"]
                    print(f"K={k} {partition} {strategy}: {r['accuracy']:.1%} "
                          f"(wrong key {wrong if wrong is None else format(wrong, '.1%')}), "
                          f"{r['minutes']:.1f} min", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    write_outputs(cfg, [])


def with_overrides(cfg: ExperimentConfig, pairs: list[str]) -> ExperimentConfig:
    """``--set FIELD=VALUE``: one experiment's variation on a YAML, recorded in every cell's config."""
    import yaml

    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {pair}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        value = yaml.safe_load(text)
        current = getattr(cfg, name)
        changes[name] = (Path(value) if isinstance(current, Path) else tuple(value) if isinstance(current, tuple)
                         else type(current)(value))
    return dataclasses.replace(cfg, **changes)


def write_outputs(cfg: ExperimentConfig, results: list[dict], quiet: bool = False) -> None:
    """results.json accumulates: cells of earlier runs into the same ``out`` stay unless rerun."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    def cell(r: dict) -> tuple:
        return r["k"], r["partition"], r["strategy"]

    earlier = json.loads((out / "results.json").read_text())["results"] if (out / "results.json").exists() else []
    rerun = {cell(r) for r in results}
    order = {s: i for i, s in enumerate(STRATEGIES)}
    results = sorted([r for r in earlier if cell(r) not in rerun] + results,
                     key=lambda r: (r["k"], r["partition"] != "iid", order.get(r["strategy"], 99)))
    lines = ["| K | partition | strategy | mean owner accuracy | wrong-key accuracy | key leakage to the cloud | "
             "parameters (shared + per key) | minutes |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        wrong = "-" if r["wrong_key_accuracy"] is None else f"{r['wrong_key_accuracy']:.1%}"
        if r.get("wrong_key_refused"):
            wrong = f"refused; {wrong} under owner0's key id"
        leak = leakage_cell(r)
        params = r["parameters"]
        lines.append(f"| {r['k']} | {r['partition']} | {r['strategy']} | {r['accuracy']:.1%} | {wrong} | {leak} | "
                     f"{params['shared']:,} + {params['per_key']:,} | {r['minutes']:.1f} |")
    table = "\n".join(lines)
    config = _jsonable(cfg)
    (out / "results.md").write_text(f"# Multi-key experiment\n\n{table}\n\nconfig: `{json.dumps(config)}`\n")
    (out / "results.json").write_text(json.dumps({"config": config, "machine": machine_facts(), "results": results},
                                                 indent=1) + "\n")
    _plot(out / "results.png", results)
    if quiet:
        return
    print(table)
    print(f"wrote {out / 'results.md'}, results.json, results.png")


def _jsonable(cfg: ExperimentConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


def leakage_cell(r: dict) -> str:
    if r["strategy"] == "plain":
        return "-"
    if r["strategy"].startswith("federated"):
        return f"none: adapters (init: {r.get('adapter_init')}) stay with the owners; the cloud holds the trunk"
    if r["leakage"] is None:
        return "none: no per-key weights"
    lk = r["leakage"]
    if lk["relative_order"] is None:
        return f"one key: adapter is the exact inverse for {lk['absolute_full']:.0%} of blocks"
    whole = "" if lk["relative_full"] is None else f", whole block {lk['relative_full']:.0%}"
    return f"relative block order {lk['relative_order']:.0%} (chance {lk['chance_order']:.0%}){whole}"


def _plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [f"K{r['k']} {r['partition'][:3]}\n{r['strategy']}" for r in results]
    ax.bar(range(len(results)), [r["accuracy"] for r in results], color="tab:blue", label="owners (own key)")
    ax.scatter(range(len(results)), [r["wrong_key_accuracy"] or 0 for r in results], color="tab:red",
               zorder=3, label="wrong key")
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set(ylabel="test accuracy", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
