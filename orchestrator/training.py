"""Training on encrypted shards: a plain PyTorch loop, plus the three lines Ray Train adds.

``fit_epochs`` is ordinary PyTorch (it runs in a test or a notebook as is). ``train_loop_per_worker``
is the same loop inside a Ray Train worker: Ray prepares the model and the loader for data
parallelism, hands back the last checkpoint after a failure, and receives a report (metrics and a
self-describing checkpoint) after every epoch. ``run_training`` starts it with a TorchTrainer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_model
from models.keyed import KeyedModel, UnknownKeyError, key_adapter_model
from orchestrator.config import KEYED_STRATEGIES, TrainingConfig
from orchestrator.data import (EncodedImages, Geometry, ShardRef, block_cutmix, group_names, mixup, normalise, partners,
                               random_crop_flip)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "etc-checkpoint"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, as plain picklable data."""

    run_name: str
    classes: tuple[str, ...]
    geometry: Geometry
    train: tuple[ShardRef, ...]
    test: tuple[ShardRef, ...]
    settings: TrainingConfig
    log_dir: str  # rank 0 appends metrics.jsonl here
    code_version: str

    @property
    def groups(self) -> list[str]:
        """Key ids (owners for plain data) the model trains on."""
        return group_names(list(self.train))


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_network(strategy: str, model: str, num_classes: int, geometry: Geometry, key_ids: list[str],
                  pretrained_file: Path | None = None) -> torch.nn.Module:
    """The network a strategy trains: the model alone, or (key-adapters, federated) one adapter
    per key id in front of the model as a shared trunk."""
    g = geometry
    net = build_model(model, num_classes, g.shape, g.in_chans, g.block_size, pretrained_file)
    if strategy in KEYED_STRATEGIES:
        net = key_adapter_model(net, key_ids, g.in_chans, g.shape, g.block_size)
    return net


def make_model(job: TrainJob) -> torch.nn.Module:
    s = job.settings
    return build_network(s.strategy, s.model, len(job.classes), job.geometry, job.groups, s.pretrained_file)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model  # DDP


def run_model(model: torch.nn.Module, x: torch.Tensor, key_index: torch.Tensor | None) -> torch.Tensor:
    """Logits; a keyed model also gets each image's key index (position in its key_ids)."""
    if isinstance(unwrap(model), KeyedModel):
        if key_index is None:
            raise UnknownKeyError("this model needs the key id of every query")
        return model(x, key_index)
    return model(x)


def make_optimizer(model: torch.nn.Module, s: TrainingConfig, steps: int):
    """AdamW with a one-cycle schedule. Adapters get adapter_lr_scale x lr and no weight decay
    (decay would pull their permutation logits back to "every block everywhere")."""
    net = unwrap(model)
    adapters = list(net.adapters.parameters()) if isinstance(net, KeyedModel) else []
    taken = {id(p) for p in adapters}
    groups = [{"params": [p for p in model.parameters() if id(p) not in taken], "lr": s.lr,
               "weight_decay": s.weight_decay}]
    if adapters:
        groups.append({"params": adapters, "lr": s.lr * s.adapter_lr_scale, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps)
    return optimizer, scheduler


def autocast_for(settings: TrainingConfig, device: torch.device):
    use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def prepare_batch(images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, job: TrainJob,
                  generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and augment one training batch; targets are soft (mixup/CutMix mix them).
    Mixing partners share the key (group): an image blended across keys fits no key's adapter."""
    x = normalise(images.to(device, non_blocking=True))
    targets = torch.nn.functional.one_hot(labels.to(device), len(job.classes)).float()
    s, g = job.settings, job.geometry
    if g.scheme == "plain":
        x = random_crop_flip(x, pad=4, generator=generator)  # plain images may use spatial augmentation
    if s.mixup_alpha > 0 or s.cutmix_prob > 0:
        if g.block_size and torch.rand(1, generator=generator).item() < s.cutmix_prob:
            x, targets = block_cutmix(x, targets, g.block_size, partners(groups, generator), generator)
        elif s.mixup_alpha > 0:
            x, targets = mixup(x, targets, s.mixup_alpha, partners(groups, generator), generator)
    return x.contiguous(memory_format=torch.channels_last), targets


def train_one_epoch(model, loader, optimizer, scheduler, job: TrainJob, device, generator) -> dict:
    model.train()
    smoothing = job.settings.label_smoothing
    total, correct, loss_sum, started = 0, 0, 0.0, time.perf_counter()
    for images, labels, groups in loader:
        x, targets = prepare_batch(images, labels, groups, job, generator, device)
        with autocast_for(job.settings, device):
            logits = run_model(model, x, groups.to(device))
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += len(labels)
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.argmax(1).cpu() == labels).sum())
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1),
            "images_per_s": total / seconds, "epoch_s": seconds}


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, settings: TrainingConfig, device,
                   key_index: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    x = normalise(images.to(device)).contiguous(memory_format=torch.channels_last)
    with autocast_for(settings, device):
        return run_model(model, x, None if key_index is None else key_index.to(device)).float()


def evaluate(model, dataset: EncodedImages, groups: list[str], settings: TrainingConfig, device,
             batch_size: int = 256, route: dict[str, str] | None = None) -> dict:
    """Overall accuracy and accuracy per group (key id or owner) of ``dataset``.

    A keyed model answers a group through the adapter of the same key id (or of ``route[group]``,
    e.g. to measure a wrong key presented under a stolen key id); groups it has no adapter for are
    refused: ``acc`` None, ``refused`` True.
    """
    net = unwrap(model)
    keyed = isinstance(net, KeyedModel)
    route = route or {}
    adapter_of = torch.tensor([net.key_ids.index(route.get(g, g)) if keyed and route.get(g, g) in net.key_ids else -1
                               for g in groups])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    hits = torch.zeros(len(groups))
    counts = torch.zeros(len(groups))
    for images, labels, group in loader:
        key_index = adapter_of[group]
        answered = key_index >= 0 if keyed else torch.ones(len(labels), dtype=torch.bool)
        counts.index_add_(0, group, torch.ones(len(labels)))
        if not bool(answered.any()):
            continue
        pred = predict_logits(model, images[answered], settings, device, key_index[answered] if keyed else None)
        hits.index_add_(0, group[answered], (pred.argmax(1).cpu() == labels[answered]).float())
    per_group = {}
    for i, g in enumerate(groups):
        if counts[i] > 0:
            refused = keyed and int(adapter_of[i]) < 0
            per_group[g] = {"acc": None if refused else float(hits[i] / counts[i]), "images": int(counts[i]),
                            "refused": refused}
    answered_groups = [v for v in per_group.values() if not v["refused"]]
    return {"test_acc": (sum(v["acc"] * v["images"] for v in answered_groups) /
                         max(1, sum(v["images"] for v in answered_groups))) if answered_groups else None,
            "per_group": per_group}


def seen_and_unseen_accuracy(per_group: dict, trained_groups: list[str]) -> dict:
    """test_acc over the keys the model trains on; test_acc_unseen_keys over the others, if any
    (keys a keyed model refuses are left out)."""
    out = {}
    for name, keep in (("test_acc", True), ("test_acc_unseen_keys", False)):
        rows = [v for g, v in per_group.items() if (g in trained_groups) == keep and v["acc"] is not None]
        if rows:
            out[name] = sum(v["acc"] * v["images"] for v in rows) / sum(v["images"] for v in rows)
    return out


def checkpoint_payload(model, optimizer, scheduler, epoch: int, job: TrainJob, metrics: dict) -> dict:
    """Self-describing: a checkpoint alone says how to rebuild and use the model (no secrets)."""
    unwrapped = unwrap(model)
    return {
        "format": CHECKPOINT_FORMAT, "version": 1,
        "model": job.settings.model, "classes": list(job.classes), "geometry": dataclasses.asdict(job.geometry),
        "strategy": job.settings.strategy, "key_ids": job.groups if job.geometry.scheme != "plain" else [],
        "owners": sorted({r.owner for r in job.train}), "run_name": job.run_name, "code_version": job.code_version,
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(job.settings).items()},
        "epoch": epoch, "metrics": metrics,
        "state_dict": unwrapped.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
    }


def load_checkpoint(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an etc-checkpoint")
    return payload


def model_from_checkpoint(payload: dict) -> torch.nn.Module:
    if payload["strategy"] == "federated":
        raise UnknownKeyError("a federated checkpoint holds the shared trunk only: the key-specific adapters stay "
                              "with their owners, so only an owner can predict with it (orchestrator.fedtask."
                              "owner_model)")
    model = build_network(payload["strategy"], payload["model"], len(payload["classes"]),
                          Geometry(**payload["geometry"]), payload["key_ids"])
    model.load_state_dict(payload["state_dict"])
    return model.to(memory_format=torch.channels_last).eval()


# --------------------------------------------------------------------------- Ray Train


def train_loop_per_worker(config: dict) -> None:
    """The training loop of one Ray Train worker (rank 0 also evaluates, logs and checkpoints)."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    s = job.settings
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(s.seed)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()

    model = make_model(job).to(memory_format=torch.channels_last)
    # Ray: DDP across workers, device placement (a batch may lack some keys: their adapters get no grad)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "find_unused_parameters": isinstance(model, KeyedModel)})
    train_set = EncodedImages(list(job.train), job.groups)
    loader = torch.utils.data.DataLoader(train_set, batch_size=s.batch_size, shuffle=True, drop_last=True)
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)  # Ray: a shard per worker
    optimizer, scheduler = make_optimizer(model, s, s.epochs * len(loader))
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()  # Ray: set when resuming after a failure or a rerun
    if checkpoint:
        with checkpoint.as_directory() as folder:
            payload = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        unwrap(model).load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        start_epoch = payload["epoch"] + 1
    test_groups = group_names(list(job.test))
    test_set = EncodedImages(list(job.test), test_groups) if rank == 0 else None
    generator = torch.Generator().manual_seed(s.seed * 1000 + rank)

    for epoch in range(start_epoch, s.epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        metrics = train_one_epoch(model, loader, optimizer, scheduler, job, device, generator)
        metrics.update(epoch=epoch + 1, worker_pid=os.getpid(), time=time.time())
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                per_group = evaluate(unwrap(model), test_set, test_groups, s, device)["per_group"]
                metrics.update(seen_and_unseen_accuracy(per_group, job.groups),
                               **{f"test_acc/{g}": v["acc"] for g, v in per_group.items()})
                torch.save(checkpoint_payload(model, optimizer, scheduler, epoch, job, metrics),
                           Path(folder) / CHECKPOINT_FILE)
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=report_checkpoint)  # Ray: dashboard metrics + checkpoint
        if rank == 0:  # logged once the checkpoint is persisted: every logged epoch can be resumed from
            with open(Path(job.log_dir) / "metrics.jsonl", "a") as log:
                log.write(json.dumps(metrics) + "\n")


def run_training(job: TrainJob, storage: Path) -> Path:
    """Train with Ray Train; returns the final checkpoint file. Rerunning resumes the same run."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = job.settings
    cpus = s.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // s.workers)
    Path(job.log_dir).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "threads": cpus},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=job.run_name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=s.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {job.run_name} produced no checkpoint: {result.error}")
    return Path(result.checkpoint.path) / CHECKPOINT_FILE  # storage_path is a filesystem path
