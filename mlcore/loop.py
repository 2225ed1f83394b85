"""The training epoch, prediction and evaluation: ordinary PyTorch over the one network interface.

Every network is called as ``model(x, key_index)`` (``models/network.py``); a network without a
per-key part ignores the index. Ray Train, the owner's Flower client and the benchmarks call these
functions as they are.
"""
from __future__ import annotations

import time

import torch

from mlcore.augment import augment_batch
from mlcore.data import EncodedImages, normalise
from mlcore.settings import TrainSettings
from models import Network
from protocol.task import Task


def unwrap(model: torch.nn.Module) -> Network:
    """The product's network inside a DDP wrapper (or the network itself)."""
    return model.module if hasattr(model, "module") else model


def make_optimizer(model: torch.nn.Module, s: TrainSettings, steps: int):
    """AdamW with a one-cycle schedule. Adapters get adapter_lr_scale x lr and no weight decay
    (decay would pull their permutation logits back to "every block everywhere")."""
    adapters = unwrap(model).adapter_parameters()
    taken = {id(p) for p in adapters}
    groups = [{"params": [p for p in model.parameters() if id(p) not in taken], "lr": s.lr,
               "weight_decay": s.weight_decay}]
    if adapters:
        groups.append({"params": adapters, "lr": s.lr * s.adapter_lr_scale, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps)
    return optimizer, scheduler


def autocast_for(settings: TrainSettings, device: torch.device):
    use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_one_epoch(model, loader, optimizer, scheduler, settings: TrainSettings, task: Task, device,
                    generator: torch.Generator) -> dict:
    """One pass over ``loader`` (batches of images, labels, key indices); returns its metrics."""
    model.train()
    total, correct, loss_sum, started = 0, 0, 0.0, time.perf_counter()
    for images, labels, groups in loader:
        x, targets = augment_batch(images, labels, groups, settings, task, generator, device)
        with autocast_for(settings, device):
            logits = model(x, groups.to(device))
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, label_smoothing=settings.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += len(labels)
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.argmax(1).cpu() == labels).sum())
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1),
            "images_per_s": total / seconds, "epoch_s": seconds, "train_images": total}


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, settings: TrainSettings, device,
                   key_index: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for uint8 images (N, C, H, W) encrypted under the keys at ``key_index``."""
    model.eval()
    x = normalise(images.to(device)).contiguous(memory_format=torch.channels_last)
    if key_index is None:
        key_index = torch.zeros(len(images), dtype=torch.long)
    with autocast_for(settings, device):
        return model(x, key_index.to(device)).float()


def evaluate(model, dataset: EncodedImages, groups: list[str], settings: TrainSettings, device,
             batch_size: int = 256, route: dict[str, str] | None = None) -> dict:
    """Overall accuracy and accuracy per group (key id or owner) of ``dataset``.

    Each group is answered through the key the model routes it to (or ``route[group]``'s, e.g. to
    measure a wrong key presented under a stolen key id); groups a keyed model has no adapter for
    are refused: ``acc`` None, ``refused`` True.
    """
    route = route or {}
    net = unwrap(model)
    routed = [net.route(route.get(g, g)) for g in groups]
    index_of = torch.tensor([-1 if r is None else r for r in routed])
    hits, counts = torch.zeros(len(groups)), torch.zeros(len(groups))
    for images, labels, group in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        key_index = index_of[group]
        answered = key_index >= 0
        counts.index_add_(0, group, torch.ones(len(labels)))
        if bool(answered.any()):
            pred = predict_logits(model, images[answered], settings, device, key_index[answered])
            hits.index_add_(0, group[answered], (pred.argmax(1).cpu() == labels[answered]).float())
    per_group = {}
    for i, g in enumerate(groups):
        if counts[i] > 0:
            refused = routed[i] is None
            per_group[g] = {"acc": None if refused else float(hits[i] / counts[i]), "images": int(counts[i]),
                            "refused": refused}
    answered_groups = [v for v in per_group.values() if not v["refused"]]
    images = sum(v["images"] for v in answered_groups)
    return {"test_acc": sum(v["acc"] * v["images"] for v in answered_groups) / images if images else None,
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
