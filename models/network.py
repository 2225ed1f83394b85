"""The one interface every network of the product has, keyed or not.

``model(x, key_index)`` gives logits for a batch whose image ``i`` was encrypted under the key at
position ``key_index[i]`` of ``model.key_ids``. A :class:`SharedInputModel` has no per-key part
(plain data, one shared key, pooled keys): it answers every image the same way and ignores the
index. A keyed model (``models/keyed.py``) routes each image through its key's adapter and
refuses a key it has none for. Training, evaluation, serving and the federated round call this
interface only; none of them asks which kind of network it holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

SHARED_PREFIX = "trunk."  # state-dict prefix of the part every key shares (what FedAvg averages)


class UnknownKeyError(KeyError):
    """A query's key id has no adapter in this model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Network(nn.Module, ABC):
    """A shared ``trunk`` behind an optional per-key input stage."""

    key_ids: list[str]  # keys with their own input stage; empty: one input path for every image
    trunk: nn.Module

    @abstractmethod
    def route(self, key_id: str | None) -> int | None:
        """The key index that answers ``key_id``; None when this model cannot answer it."""

    def key_index(self, key_id: str | None) -> int:
        """Like :meth:`route`, but an unanswerable key id is an error."""
        index = self.route(key_id)
        if index is None:
            raise UnknownKeyError(f"no adapter for key id {key_id or '(none)'}; this model knows "
                                  f"{', '.join(self.key_ids)}")
        return index

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The per-key parameters (trained with their own learning rate, never decayed)."""
        return []

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in all, in the shared trunk and per key (for reports)."""
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "shared": sum(p.numel() for p in self.trunk.parameters()),
                "per_key": sum(p.numel() for p in self.adapter_parameters()) // max(1, len(self.key_ids))}


class SharedInputModel(Network):
    """A network with no per-key part: every key id (or none) goes through the same trunk."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.key_ids = []
        self.trunk = trunk

    def route(self, key_id: str | None) -> int | None:
        return 0

    def forward(self, x: torch.Tensor, key_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk(x)
