"""Multi-key experiment runner: one model from K owners' data, each owner with its own key.

    python -m benchmarks.multikey benchmarks/multikey-cpu.yaml

For every K in ``owners`` and every partition (IID, or non-IID with Dirichlet(alpha) class
proportions per owner), it splits a class-balanced subset of the data among K owners, encrypts
each owner's share with the owner pipeline, trains every strategy at an equal budget with the
product's Ray Train loop, and evaluates every owner on the held-out test images encrypted under
its own key, plus the same images under a key no owner has ("wrong key"). Writes a markdown
table, a plot and a JSON record (config, code version, every number) to ``out``.

Strategies measured: plain (no encryption), shared-key (all owners, one key), pooled (a key per
owner, one model, no key information).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import ROOT, machine_facts
from orchestrator.config import TrainingConfig, load_dataclass
from orchestrator.data import Geometry, ShardRef
from orchestrator.launch import evaluate_checkpoint
from orchestrator.training import TrainJob, code_version, run_training
from owners.keys import OwnerKey
from owners.prepare import EncryptSettings, encrypt_folder
from owners.shards import Manifest

STRATEGIES = ("plain", "shared-key", "pooled")


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
    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.01
    seed: int = 0
    out: Path = ROOT / "results" / "multikey"


def key_for(name: str, seed: int) -> OwnerKey:
    """Deterministic experiment keys (never used for real data)."""
    return OwnerKey(name, hashlib.sha256(f"multikey-experiment/{seed}/{name}".encode()).digest())


def split_owners(files: dict[str, list[Path]], k: int, partition: str, alpha: float, rng) -> list[dict[str, list[Path]]]:
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


def prepare(folder: Path, out: Path, key: OwnerKey | None, classes: tuple[str, ...], split: str, owner: str) -> tuple[ShardRef, ...]:
    encrypt_folder(folder, out, key, EncryptSettings(scheme="plain" if key is None else "color", split=split,
                                                      classes=classes, max_bad_fraction=1.0), progress=False)
    m = Manifest.load(out)
    return tuple(ShardRef(str(out / s.name), owner, m.key_id, split, s.count) for s in m.shards)


def run_cell(cfg: ExperimentConfig, k: int, partition: str, strategy: str, shares, test_dir: Path,
             classes: tuple[str, ...], work: Path) -> dict:
    """Train one strategy on one split; evaluate every owner and the wrong key."""
    tag = f"k{k}-{partition}-{strategy}"
    keys = {f"owner{i}": (None if strategy == "plain" else
                          key_for("shared" if strategy == "shared-key" else f"owner{i}", cfg.seed)) for i in range(k)}
    train, test = (), ()
    for i, share in enumerate(shares):
        owner = f"owner{i}"
        if not any(share.values()):
            continue  # a Dirichlet split can leave an owner without images
        materialise(share, work / tag / owner / "imgs")
        train += prepare(work / tag / owner / "imgs", work / tag / owner / "train", keys[owner], classes, "train", owner)
    for owner in sorted({r.owner for r in train}):
        test += prepare(test_dir, work / tag / owner / "test", keys[owner], classes, "test", owner)
    if strategy != "plain":
        test += prepare(test_dir, work / tag / "wrong-key", key_for("wrong", cfg.seed), classes, "test", "wrong-key")
    settings = TrainingConfig(model=cfg.model, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                              seed=cfg.seed, strategy=strategy)
    job = TrainJob(tag, classes, Geometry(32, None if strategy == "plain" else 16,
                                          "plain" if strategy == "plain" else "color"),
                   train, test, settings, str(work / tag / "logs"), code_version())
    started = time.perf_counter()
    checkpoint = run_training(job, work / "ray")
    minutes = (time.perf_counter() - started) / 60
    rows = evaluate_checkpoint(checkpoint, job)
    owners = [r for r in rows if r["owner"] != "wrong-key"]
    wrong = [r for r in rows if r["owner"] == "wrong-key"]
    return {"k": k, "partition": partition, "strategy": strategy, "minutes": minutes,
            "accuracy": float(np.mean([r["accuracy"] for r in owners])),
            "per_owner": {r["owner"]: r["accuracy"] for r in owners},
            "wrong_key_accuracy": wrong[0]["accuracy"] if wrong else None,
            "train_images": sum(r.images for r in train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML (fields of ExperimentConfig)")
    cfg = load_dataclass(ExperimentConfig, parser.parse_args().config)
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for k in cfg.owners:
            for partition in (cfg.partitions if k > 1 else cfg.partitions[:1]):
                shares = split_owners(train_files, k, partition, cfg.dirichlet_alpha, rng)
                for strategy in cfg.strategies:
                    if k == 1 and strategy == "pooled":
                        continue  # one owner: pooled is shared-key
                    results.append(run_cell(cfg, k, partition, strategy, shares, test_dir, classes, work))
                    r = results[-1]
                    print(f"K={k} {partition} {strategy}: {r['accuracy']:.1%} "
                          f"(wrong key {r['wrong_key_accuracy'] if r['wrong_key_accuracy'] is None else format(r['wrong_key_accuracy'], '.1%')}), "
                          f"{r['minutes']:.1f} min", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    write_outputs(cfg, results)


def write_outputs(cfg: ExperimentConfig, results: list[dict]) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| K | partition | strategy | mean owner accuracy | wrong-key accuracy | key leakage | minutes |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        wrong = "-" if r["wrong_key_accuracy"] is None else f"{r['wrong_key_accuracy']:.1%}"
        leak = "-" if r["strategy"] == "plain" else "not measured yet"
        lines.append(f"| {r['k']} | {r['partition']} | {r['strategy']} | {r['accuracy']:.1%} | {wrong} | {leak} | "
                     f"{r['minutes']:.1f} |")
    table = "\n".join(lines)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    (out / "results.md").write_text(f"# Multi-key experiment\n\n{table}\n\nconfig: `{json.dumps(config)}`\n")
    (out / "results.json").write_text(json.dumps({"config": config, "machine": machine_facts(), "results": results},
                                                 indent=1) + "\n")
    _plot(out / "results.png", results)
    print(table)
    print(f"wrote {out / 'results.md'}, results.json, results.png")


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
