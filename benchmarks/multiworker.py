"""One Ray Train worker (batch B) vs two DDP workers (batch B/2 each): equal global batch, same CPUs.

Takes a class-balanced subset of the CIFAR-10 training JPEGs in ../shared/data/cifar10-jpeg/train,
holds out the last images of each class as a test split, encrypts both under one key (shared-key),
and trains the product's Ray Train loop twice per seed: 1 worker with all CPUs and batch B, then 2
workers (gloo) with half the CPUs and batch B/2 each. Prints held-out accuracy and wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, report
from benchmarks.train_accuracy import KEY, encrypted_splits, subset
from mlcore.checkpoint import code_version
from orchestrator.config import TrainingConfig
from orchestrator.launch import evaluate_checkpoint
from orchestrator.training import TrainJob, run_training
from protocol.task import Task


def one_run(work: Path, task: Task, splits: tuple, settings: TrainingConfig, name: str) -> dict:
    job = TrainJob(name, task, splits[0], splits[1], settings, str(work / f"logs-{name}"), code_version())
    started = time.perf_counter()
    checkpoint = run_training(job, work / "ray")
    seconds = time.perf_counter() - started
    (row,) = [r for r in evaluate_checkpoint(checkpoint, job) if r["seen_in_training"]]
    epochs = [json.loads(x) for x in (Path(job.log_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy": row["accuracy"], "seconds": seconds, "world_size": epochs[-1]["world_size"],
            "images_per_epoch": sum(r["images"] for r in epochs[-1]["ranks"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg/train"))
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="global batch B (2 workers: B/2 each)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--model", default="convmixer_256_8_p4_k9")
    parser.add_argument("--json")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="multiworker-bench-"))
    runs = []
    try:
        src = Path(args.data)
        n_per_class = len(list(next(p for p in src.iterdir() if p.is_dir()).iterdir()))
        classes = subset(src, work / "train", 0, args.train_per_class)
        subset(src, work / "test", n_per_class - args.test_per_class, args.test_per_class)
        task = Task(classes, scheme="color")
        splits = encrypted_splits(work, task, KEY)
        splits = (splits[0], tuple(r for r in splits[1] if r.key_id == KEY.key_id))
        for seed in range(args.seeds):
            for workers in (1, 2):
                settings = TrainingConfig(model=args.model, epochs=args.epochs, batch_size=args.batch // workers,
                                          workers=workers, cpus_per_worker=args.cpus // workers, seed=seed,
                                          strategy="shared-key")
                runs.append({"workers": workers, "seed": seed, **one_run(work, task, splits, settings,
                                                                          f"w{workers}-s{seed}")})
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    rows = [[r["workers"], args.batch // r["workers"], r["seed"], r["accuracy"] * 100, r["seconds"],
             r["images_per_epoch"]] for r in runs]
    mean = {w: sum(r["accuracy"] for r in runs if r["workers"] == w) / args.seeds * 100 for w in (1, 2)}
    report("One worker vs two DDP workers at equal global batch (CPU, Ray Train)",
           ["workers", "batch per worker", "seed", "held-out accuracy %", "wall s (incl. Ray start of workers)",
            "images trained per epoch (all ranks)"], rows,
           [f"{args.model}, shared-key EtC, {args.epochs} epochs, global batch {args.batch}, {args.cpus} CPUs in all; "
            f"{args.train_per_class * 10} train / {args.test_per_class * 10} held-out test images.",
            f"mean accuracy: 1 worker {mean[1]:.1f}%, 2 workers {mean[2]:.1f}% over {args.seeds} seed(s)"],
           args.json, extra={"runs": runs, "settings": dataclasses.asdict(TrainingConfig(model=args.model))})


if __name__ == "__main__":
    main()
