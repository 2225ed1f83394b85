"""Who may upload under which key id.

A key id is the fingerprint of an owner's secret key. Data under a key id trains that key's
adapter (``key-adapters``, ``federated``) and is what predictions under that key id answer for, so
a key id belongs to the owner that first registered it: another owner committing under it would
train the victim's adapter with its own data. Two exceptions, both decided by the operator in
``cluster.yaml``, never by an owner:

- ``ingest.shared_keys`` names key ids that several named owners hold (one organisation, several
  sites); only those owners may upload under them.
- ``training.strategy: shared-key`` trains one model under one key that every owner holds, with no
  per-key adapter: its train data may use one key id only, and any listed owner may upload under any
  key id. The first train dataset
  opened fixes that key id, unless ``ingest.shared_keys`` declares it, which an operator who does not
  want a hostile owner to race the others should do.

Its test splits may use other keys (to measure how the model does on keys it never saw).

A third case needs no operator: ``task.key_mode: per-image``. Every image then has its own fresh key
that nobody keeps, and every upload carries the key id ``per-image`` (``PER_IMAGE_KEY_ID``), which is
no one's key: any owner may upload under it, and it is the only key id such a run takes. In a run
with one key per owner (key_mode ``owner``) the sentinel is refused: data claiming to be under
per-image keys cannot train a model that expects owners' keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from orchestrator.errors import NotYourKey, WrongState
from protocol.task import PER_IMAGE_KEY_ID


@dataclass(frozen=True)
class KeyPolicy:
    single_key: bool = False  # training.strategy shared-key: one key id for all train data
    shared: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))  # key id -> owners
    per_image: bool = False  # task.key_mode per-image: the one key id is PER_IMAGE_KEY_ID, nobody's

    @classmethod
    def from_config(cls, cfg) -> KeyPolicy:
        """The policy a ``ClusterConfig`` declares."""
        shared = {entry.key_id: frozenset(entry.owners) for entry in cfg.ingest.shared_keys}
        return cls(single_key=cfg.training.strategy == "shared-key", shared=MappingProxyType(shared),
                   per_image=cfg.task.per_image_keys)

    def check(self, owner: str, key_id: str, split: str, holders: set[str], train_key_ids: set[str]) -> None:
        """Refuse ``owner`` opening a ``split`` dataset under ``key_id``. ``holders``: owners that
        registered ``key_id`` before; ``train_key_ids``: key ids of the run's train datasets so far."""
        if self._per_image_key(key_id):
            return  # a fresh key per image: the key id names no key, so it belongs to nobody
        declared = self.shared.get(key_id)
        if declared is not None and owner not in declared:
            raise NotYourKey(f"key id {key_id} is declared in the cluster's shared_keys for other owners, not for "
                             f"{owner}: ask the operator, or encrypt with your own key")
        if self.single_key:  # one model, no per-key adapter: a key id trains nobody's adapter
            if split == "train":
                self._check_run_key(key_id, train_key_ids)
            return
        if declared is None and holders - {owner}:
            # Naming the holder would tell one owner about another: the message does not.
            raise NotYourKey(f"key id {key_id} is registered to another owner; data under it would train their "
                             "model. Encrypt with your own key, or ask the operator to declare the key shared "
                             "(ingest.shared_keys)")

    def _per_image_key(self, key_id: str) -> bool:
        """Whether ``key_id`` is the per-image sentinel; refuse it, or an owner's key, where it does not fit."""
        if key_id == PER_IMAGE_KEY_ID and not self.per_image:
            raise WrongState(f"key id {PER_IMAGE_KEY_ID!r} is for data under a fresh key per image (task.key_mode "
                             "per-image); this run trains on owners' keys (task.key_mode owner): encrypt with your key")
        if key_id != PER_IMAGE_KEY_ID and self.per_image:
            raise WrongState(f"this run takes a fresh key per image (task.key_mode per-image); data under key id "
                             f"{key_id} (one key for many images) cannot join it: upload with the task the server "
                             "sends (owner-agent draws the keys itself)")
        return key_id == PER_IMAGE_KEY_ID

    def _check_run_key(self, key_id: str, train_key_ids: set[str]) -> None:
        if self.shared and key_id not in self.shared:
            raise WrongState(f"this run trains under one key (training.strategy shared-key) declared in "
                             f"ingest.shared_keys ({', '.join(sorted(self.shared))}); key id {key_id} is not it: "
                             "encrypt with the run's shared key")
        others = train_key_ids - {key_id}
        if others:
            raise WrongState(f"this run trains under one key (training.strategy shared-key) and its train data uses "
                             f"key id {', '.join(sorted(others))}; key id {key_id} cannot join it: encrypt with "
                             "the run's shared key")
