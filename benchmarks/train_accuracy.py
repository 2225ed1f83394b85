"""CPU-budget accuracy: plain vs shared-key colour EtC, same model, same epochs, through Ray Train.

Takes a class-balanced subset of the CIFAR-10 training JPEGs in ../shared/data/cifar10-jpeg/train,
holds out a test split (the last images of each class, never trained on), prepares shards with the
owner pipeline (plain, or encrypted under one key), trains ConvMixer with the product's Ray Train
loop, and evaluates on the held-out split, plus the encrypted model on the same test images under a
key it never saw. Also reports training images/s of both runs (the pipeline is the same; the ratio
should be 1.0).
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
from mlcore.checkpoint import code_version
from mlcore.data import ShardRef, outbox_refs
from orchestrator.config import TrainingConfig
from orchestrator.launch import evaluate_checkpoint
from orchestrator.training import TrainJob, run_training
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.task import Task

KEY = OwnerKey("shared", bytes(range(32)))
UNSEEN_KEY = OwnerKey("unseen", bytes(range(32, 64)))
RUNS = (("plain", "plain", None), ("shared-key EtC", "color", KEY))  # name, task.scheme, key


def subset(src: Path, dst: Path, first: int, count: int) -> tuple[str, ...]:
    classes = tuple(sorted(p.name for p in src.iterdir() if p.is_dir()))
    for cls in classes:
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[first:first + count]:
            (dst / cls / f.name).symlink_to(f)
    return classes


def encrypted_splits(work: Path, task: Task, key: OwnerKey | None) -> tuple[tuple[ShardRef, ...], tuple[ShardRef, ...]]:
    """Train and test shards of ``work/train`` and ``work/test`` for ``task``; with a key, the test
    images also under a key the model never sees."""
    refs = {}
    for split in ("train", "test"):
        box = work / f"{task.scheme}-{split}"
        encrypt_folder(work / split, box, key, EncryptSettings(task=task, split=split), progress=False)
        refs[split] = outbox_refs(box, "owner")
    if key is not None:  # the same test images under a key the model never saw
        unseen = work / "unseen-test"
        encrypt_folder(work / "test", unseen, UNSEEN_KEY, EncryptSettings(task=task, split="test"), progress=False)
        refs["test"] += outbox_refs(unseen, "owner")
    return refs["train"], refs["test"]


def train_and_evaluate(work: Path, classes: tuple[str, ...], scheme: str, key: OwnerKey | None,
                       settings: TrainingConfig) -> tuple[list, dict]:
    """One run: table row [test %, unseen-key %, best images/s, minutes] and its full record."""
    task = Task(classes, scheme=scheme)
    train, test = encrypted_splits(work, task, key)
    job = TrainJob(f"bench-{scheme}", task, train, test,
                   dataclasses.replace(settings, strategy="plain" if key is None else "shared-key"),
                   str(work / f"logs-{scheme}"), code_version())
    started = time.perf_counter()
    checkpoint = run_training(job, work / "ray")
    minutes = (time.perf_counter() - started) / 60
    results = evaluate_checkpoint(checkpoint, job)
    epochs = [json.loads(x) for x in (Path(job.log_dir) / "metrics.jsonl").read_text().splitlines()]
    speed = max(e["images_per_s"] for e in epochs)
    seen = next(r for r in results if r["seen_in_training"])
    wrong = next((r for r in results if not r["seen_in_training"]), None)
    row = [seen["accuracy"] * 100, "-" if wrong is None else round(wrong["accuracy"] * 100, 1), speed, minutes]
    return row, {"results": results, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg/train"))
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="convmixer_256_8_p4_k9")
    parser.add_argument("--json")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    rows, per_run = [], {}
    settings = TrainingConfig(model=args.model, epochs=args.epochs, batch_size=64)
    try:
        src = Path(args.data)
        n_per_class = len(list(next(p for p in src.iterdir() if p.is_dir()).iterdir()))
        classes = subset(src, work / "train", 0, args.train_per_class)
        subset(src, work / "test", n_per_class - args.test_per_class, args.test_per_class)
        for name, scheme, key in RUNS:
            row, per_run[name] = train_and_evaluate(work, classes, scheme, key, settings)
            rows.append([name, *row])
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    ratio = rows[1][3] / rows[0][3]
    report("Accuracy at equal budget, CPU (Ray Train, 1 worker)",
           ["run", "test accuracy %", "same test images, unseen key %", "train images/s (best epoch)", "minutes"],
           rows,
           [f"{args.model}, {args.epochs} epochs, AdamW one-cycle lr {settings.lr}, batch 64, label smoothing "
            f"{settings.label_smoothing}; {args.train_per_class * 10} train / {args.test_per_class * 10} held-out "
            "test images (the last of each class). Plain uses random crop + flip; EtC uses none (they break blocks).",
            f"training throughput encrypted / plain: {ratio:.2f} (plain's crop+flip runs in the same loop)"],
           args.json, extra={"runs": per_run})


if __name__ == "__main__":
    main()
