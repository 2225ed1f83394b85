"""Self-describing checkpoints: a checkpoint alone says how to rebuild and use its model (no secrets).

A checkpoint holds a header (format, task, model name, strategy, key ids, training settings, run
name, code version) plus the weights and, for resuming, the optimizer and schedule state.
"""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import torch

from mlcore.loop import unwrap
from mlcore.settings import TrainSettings
from models import Network, UnknownKeyError, build_network
from protocol.task import Task

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "etc-checkpoint"
CHECKPOINT_VERSION = 2  # 2: one network interface (every model's weights under "trunk."), the task stored whole


class CheckpointError(ValueError):
    """A file is not a checkpoint this code can read."""


def code_version() -> str:
    """The git commit the code runs from ("unknown" outside a git checkout): results record it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header(task: Task, settings: TrainSettings, key_ids: list[str], **extra) -> dict:
    """What a checkpoint says about itself; ``extra``: run name, owners, rounds, ..."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "task": dataclasses.asdict(task),
            "classes": list(task.classes), "model": settings.model, "strategy": settings.strategy,
            "key_ids": list(key_ids), "training": settings.to_dict(), "code_version": code_version(), **extra}


def payload(head: dict, model, optimizer, scheduler, epoch: int, metrics: dict) -> dict:
    """Header plus weights and the state to resume from after ``epoch`` (0-based)."""
    return {**head, "epoch": epoch, "metrics": metrics, "state_dict": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def load_checkpoint(path: Path) -> dict:
    # weights_only=False: the header holds plain Python values (lists, dicts) besides tensors; a
    # checkpoint is only ever read from the run's own storage.
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an etc-checkpoint")
    if data.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {data.get('version')}, this code reads "
                              f"{CHECKPOINT_VERSION}; retrain or use the code version it records "
                              f"({data.get('code_version')})")
    return data


def task_of(data: dict) -> Task:
    return Task(**{**data["task"], "classes": tuple(data["task"]["classes"])})


def model_from_checkpoint(data: dict) -> Network:
    """The trained network, ready to predict (eval mode, channels-last)."""
    if data["strategy"] == "federated":
        raise UnknownKeyError("a federated checkpoint holds the shared trunk only: the key-specific adapters stay "
                              "with their owners, so only an owner can predict with it (mlcore.federated."
                              "owner_model)")
    keyed = TrainSettings.from_dict(data["training"]).keyed
    model = build_network(data["model"], len(data["classes"]), task_of(data).model_input,
                          data["key_ids"] if keyed else None)
    model.load_state_dict(data["state_dict"])
    return model.to(memory_format=torch.channels_last).eval()
