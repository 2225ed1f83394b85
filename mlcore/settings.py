"""The training settings the ML core reads: one frozen dataclass, every field with its unit or reason.

``cluster.yaml``'s ``training:`` section is these fields plus the cloud's own (workers, waiting
for owners; ``orchestrator/config.py``). The federated plan sends exactly these to owners.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

STRATEGIES = ("plain", "shared-key", "pooled", "key-adapters", "federated", "per-image-keys")
KEYED_STRATEGIES = ("key-adapters", "federated")  # a per-key adapter in front of a shared trunk
PRECISIONS = ("auto", "fp32", "bf16")


def bounded(default: float, low: float, high: float) -> float:
    """A numeric field allowed only in [low, high]. Every number a config or a plan carries has one:
    a negative learning rate or a batch of a billion images is refused with the field's name before
    anything runs (``range_errors``), on the cloud and on an owner's machine alike."""
    return dataclasses.field(default=default, metadata={"range": (low, high)})


def range_errors(obj: object, where: str = "") -> list[str]:
    """``field: value is outside [low, high]`` for every bounded field of a dataclass outside its range
    (NaN is outside every range)."""
    errors = []
    for f in dataclasses.fields(obj):
        if "range" in f.metadata:
            low, high = f.metadata["range"]
            value = getattr(obj, f.name)
            if not low <= value <= high:
                errors.append(f"{where}{f.name}: {value!r} is outside the allowed range [{low}, {high}]")
    return errors


@dataclass(frozen=True)
class TrainSettings:
    strategy: str = "shared-key"  # plain | shared-key | pooled | key-adapters | federated | per-image-keys (a fresh
    # key per image, task.key_mode per-image: a network invariant to every key, models/invariant.py)
    model: str = "convmixer_256_8_p4_k9"  # a name registered in models/ (or any timm name)
    epochs: int = bounded(10, 1, 100_000)
    batch_size: int = bounded(64, 1, 65_536)  # per worker
    lr: float = bounded(0.01, 1e-8, 10.0)  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = bounded(0.05, 0.0, 10.0)
    label_smoothing: float = bounded(0.1, 0.0, 0.99)  # 1 would erase the labels
    mixup_alpha: float = bounded(0.0, 0.0, 100.0)  # > 0: mixup with Beta(alpha, alpha) (the paper used mixup + CutMix)
    cutmix_prob: float = bounded(0.0, 0.0, 1.0)  # probability of block-aligned CutMix instead of mixup for a batch
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU: bf16 is 6x slower on CPUs without AMX) | fp32 | bf16
    pretrained_file: Path | None = None  # local weights for timm models (e.g. ViT-B/16); never downloaded
    adapter_lr_scale: float = bounded(10.0, 1e-3, 1e4)  # key-adapters/federated: adapters' peak lr = lr x this (a soft
    # block permutation must become a hard one within one schedule)
    seed: int = bounded(0, 0, 2**63 - 1)

    @property
    def keyed(self) -> bool:
        """Whether the network has one adapter per key id."""
        return self.strategy in KEYED_STRATEGIES

    def core(self) -> TrainSettings:
        """Just these fields (a subclass adds the cloud's own; owners never receive those)."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)})

    def to_dict(self) -> dict:
        """JSON-ready: paths as strings."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: dict) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        values = {k: v for k, v in doc.items() if k in known}
        if values.get("pretrained_file"):
            values["pretrained_file"] = Path(values["pretrained_file"])
        return TrainSettings(**values)
