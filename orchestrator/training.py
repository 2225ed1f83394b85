"""Training on encrypted shards with Ray Train: the ML core's loop plus the few lines Ray adds.

``train_loop_per_worker`` is the ML core's epoch (``mlcore/loop.py``) inside a Ray Train worker:
Ray prepares the model and the loader for data parallelism, hands back the last checkpoint after a
failure, and receives a report (metrics and a self-describing checkpoint) after every epoch.
``run_training`` starts it with a TorchTrainer.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlcore import checkpoint as ckpt
from mlcore.data import EncodedImages, ShardRef, group_names
from mlcore.loop import evaluate, make_optimizer, seen_and_unseen_accuracy, train_one_epoch, unwrap
from models import Network, build_network
from orchestrator.config import TrainingConfig
from orchestrator.errors import RunFailed
from protocol.task import Task


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, as plain picklable data."""

    run_name: str
    task: Task
    train: tuple[ShardRef, ...]
    test: tuple[ShardRef, ...]
    settings: TrainingConfig
    log_dir: str  # rank 0 appends metrics.jsonl here
    code_version: str
    # What the cloud left out and why (``orchestrator/launch.py: select_data``), for the report:
    # whole datasets or owners ({"owner", "what", "images", "reason"}), and per owner the samples
    # skipped inside data that does train ({"images", "bad", "reasons"}).
    exclusions: tuple[dict, ...] = ()
    skipped: dict[str, dict] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        """Key ids (owners for plain data) the model trains on."""
        return group_names(list(self.train))

    def checkpoint_header(self) -> dict:
        return ckpt.header(self.task, self.settings.core(), self.groups if self.task.encrypted else [],
                           owners=sorted({r.owner for r in self.train}), run_name=self.run_name)


def make_model(job: TrainJob) -> Network:
    s = job.settings
    return build_network(s.model, len(job.task.classes), job.task.model_input, job.groups if s.keyed else None,
                         s.pretrained_file)


def _resume(model, optimizer, scheduler) -> int:
    """Ray hands back the last checkpoint after a failure or on a rerun: load it, return the next epoch."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as folder:
        data = ckpt.load_checkpoint(Path(folder) / ckpt.CHECKPOINT_FILE)
    unwrap(model).load_state_dict(data["state_dict"])
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    return data["epoch"] + 1


def _report_epoch(job: TrainJob, epoch: int, metrics: dict, state: tuple, test_set, device) -> None:
    """Rank 0 evaluates and checkpoints; every rank reports (Ray: dashboard metrics + checkpoint)."""
    import ray.train

    model, optimizer, scheduler = state
    with tempfile.TemporaryDirectory() as folder:
        report_checkpoint = None
        if test_set is not None:
            test_groups = group_names(list(job.test))
            per_group = evaluate(unwrap(model), test_set, test_groups, job.settings, device)["per_group"]
            metrics.update(seen_and_unseen_accuracy(per_group, job.groups),
                           **{f"test_acc/{g}": v["acc"] for g, v in per_group.items()})
            torch.save(ckpt.payload(job.checkpoint_header(), model, optimizer, scheduler, epoch, metrics),
                       Path(folder) / ckpt.CHECKPOINT_FILE)
            report_checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=report_checkpoint)
    if test_set is not None:  # logged once the checkpoint is persisted: every logged epoch can be resumed from
        with open(Path(job.log_dir) / "metrics.jsonl", "a") as log:
            log.write(json.dumps(metrics) + "\n")


def train_loop_per_worker(config: dict) -> None:
    """The training loop of one Ray Train worker (rank 0 also evaluates, logs and checkpoints)."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    s = job.settings
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(s.seed)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    model = make_model(job).to(memory_format=torch.channels_last)
    # Ray: DDP across workers and device placement (a batch may lack some keys: their adapters get no grad)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": s.keyed})
    train_set = EncodedImages(list(job.train), job.groups, job.task)  # unusable samples skipped, counted
    loader = torch.utils.data.DataLoader(train_set, batch_size=s.batch_size, shuffle=True, drop_last=True)
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)  # Ray: a shard per worker
    optimizer, scheduler = make_optimizer(model, s, s.epochs * len(loader))
    start_epoch = _resume(model, optimizer, scheduler)
    test_set = EncodedImages(list(job.test), group_names(list(job.test)), job.task) if rank == 0 else None
    generator = torch.Generator().manual_seed(s.seed * 1000 + rank)
    for epoch in range(start_epoch, s.epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        metrics = train_one_epoch(model, loader, optimizer, scheduler, s, job.task, device, generator)
        metrics.update(epoch=epoch + 1, worker_pid=os.getpid(), time=time.time(), train_samples=len(train_set),
                       world_size=ray.train.get_context().get_world_size(), ranks=_ranks(metrics["train_images"]),
                       **{f"decode_failures/{o}": train_set.decode_failures.count(o)
                          for o in train_set.decode_failures.by_owner})
        _report_epoch(job, epoch, metrics, (model, optimizer, scheduler), test_set, device)


def _ranks(images: int) -> list[dict]:
    """What every worker did this epoch, gathered to each rank: {"rank", "node_id", "pid", "images"}
    (images it trained on: the ranks' shards of the epoch add up to it; the node shows where it ran)."""
    import ray
    import ray.train

    mine = {"rank": ray.train.get_context().get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(), "images": images}
    if not torch.distributed.is_initialized():
        return [mine]
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)  # every rank calls it, once per epoch
    return everyone


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
    logs = f"Ray Train's run folder {Path(storage).resolve() / job.run_name}, metrics in {job.log_dir}"
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error (WorkerGroupError, TrainingFailedError): say it in one line
        raise RunFailed(f"step 'training' of run {job.run_name} failed: {worker_error(exc)}; see {logs}") from exc
    if result.checkpoint is None:
        raise RunFailed(f"step 'training' of run {job.run_name} produced no checkpoint: "
                        f"{worker_error(result.error)}; see {logs}")
    return Path(result.checkpoint.path) / ckpt.CHECKPOINT_FILE  # storage_path is a filesystem path


def worker_error(exc: BaseException | None) -> str:
    """The worker's own error out of Ray's wrapper, in one line: the first failed worker's (Ray Train
    keeps them in ``worker_failures``), else the last line of the message that names an exception
    (Ray puts the worker's traceback in its message), else its first line."""
    if exc is None:
        return "no error reported"
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        return f"worker {rank}: {worker_error(failures[rank])}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^(?:\w+\.)*[A-Z]\w*: \S", line)]
    if named:
        return named[-1][:500]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]
