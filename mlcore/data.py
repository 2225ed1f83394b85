"""From shards to tensors: which shards train, and a torch dataset over them.

Everything here is plain torch and numpy (no Ray): the training loop uses it on a laptop or inside
a Ray Train worker alike. Images stay encoded in memory (about 1 KB each at 32x32) and are
decoded per sample; pixels are normalised as (x/255 - 0.5)/0.5 so that a negative-positive block
(p XOR 255 = 255 - p) becomes a sign flip, up to float rounding (``docs/design.md``).

Training does not trust what it reads: a stored shard may predate the store's checks or be damaged
on disk. With a task, every sample is checked when a shard is read (label within the task's
classes, then ``check_encoded``: format, size and mode from the header before any pixel is
decoded, then one full decode), and a sample that fails is skipped and counted against its owner
(:class:`BadSamples`) instead of ending the run; a shard that cannot be read at all counts every
image its manifest declares. Decoding per sample is guarded too.
"""
from __future__ import annotations

import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.codec import CodecError, check_encoded, decode
from protocol.shards import Manifest, ShardInfo, iter_samples
from protocol.task import Task

SAMPLE_MEMBER = re.compile(r"^([0-9a-f]{32})\.(jpg|png|cls)$")  # what ShardWriter writes, nothing else
MAX_LABEL_CHARS = 6
DECODE_RETRIES = 16  # a sample that fails to decode is replaced by one of the next ones


@dataclass(frozen=True)
class ShardRef:
    """One stored shard and whose data it is (the plan handed to training workers)."""

    path: str  # object file in the store (a shared filesystem on multi-node clusters)
    owner: str
    key_id: str | None  # None for plain data
    split: str  # train | test
    images: int


def shard_refs(shards: Iterable[ShardInfo], locate: Callable[[ShardInfo], Path], owner: str, key_id: str | None,
               split: str) -> tuple[ShardRef, ...]:
    """ShardRefs of one dataset's shards; ``locate`` says where each shard's file is."""
    return tuple(ShardRef(str(locate(s)), owner, key_id, split, s.count) for s in shards)


def outbox_refs(folder: Path, owner: str, split: str | None = None) -> tuple[ShardRef, ...]:
    """ShardRefs of an outbox folder (manifest.json + shards), as ``owner``; split from the manifest."""
    m = Manifest.load(Path(folder))
    return shard_refs(m.shards, lambda s: Path(folder) / s.name, owner, m.key_id, split or m.split)


class BadSamples:
    """Samples that cannot train, per owner, with the reason for each (``reason -> count``)."""

    def __init__(self) -> None:
        self.by_owner: dict[str, Counter[str]] = {}

    def add(self, owner: str, reason: str, count: int = 1) -> None:
        if count > 0:
            self.by_owner.setdefault(owner, Counter())[reason] += count

    def count(self, owner: str) -> int:
        return sum(self.by_owner.get(owner, Counter()).values())

    def reasons(self, owner: str) -> dict[str, int]:
        return dict(self.by_owner.get(owner, Counter()).most_common())

    def merge(self, other: BadSamples) -> None:
        for owner, reasons in other.by_owner.items():
            for reason, count in reasons.items():
                self.add(owner, reason, count)


def sample_problem(data: bytes, label_text: bytes, task: Task) -> str | None:
    """Why one sample cannot train under ``task`` (None if it can): a label that is not one of the
    task's classes, or an image that is not the task's codec, size and mode or does not decode."""
    if not label_text.isdigit() or len(label_text) > MAX_LABEL_CHARS:
        return "label is not a number"
    if int(label_text) >= len(task.classes):
        return f"label outside the task's {len(task.classes)} classes"
    shape = task.model_input
    try:
        check_encoded(data, task.format, shape.shape, shape.in_chans)
    except CodecError as exc:
        return str(exc)
    except Exception as exc:  # hostile bytes may trip any decoder error: the sample is unusable, not the run
        return f"image does not decode ({type(exc).__name__})"
    return None


def max_member_bytes(task: Task) -> int:
    """Bytes an encoded image of the task can reasonably take (raw pixels plus room for headers):
    a larger tar member is not read into memory at all."""
    rows, columns = task.model_input.shape
    return 2 * rows * columns * task.model_input.in_chans + 65_536


def _tar_samples(path: str, declared: int, task: Task, bad: BadSamples, owner: str) -> Iterator[tuple[bytes, bytes]]:
    """(image bytes, label text) of each complete sample; members that are not a sample's, or too
    large, are counted in ``bad`` unread. Uncompressed tars only (a compressed one could be a bomb)."""
    limit, members = max_member_bytes(task), 0
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:") as tar:
        while (member := tar.next()) is not None:
            members += 1
            if members > 2 * declared + 2:  # more than its manifest says: stop reading a hostile file
                bad.add(owner, "more members than the manifest's sample count; rest of the shard ignored")
                break
            match = SAMPLE_MEMBER.fullmatch(member.name)
            if not member.isfile() or match is None or member.size > limit:
                bad.add(owner, "tar member that is not a sample image or label, or too large")
                continue
            stem, ext = match.groups()
            entry = pending.setdefault(stem, {})
            entry[ext] = tar.extractfile(member).read()
            if "cls" in entry and len(entry) == 2:
                del pending[stem]
                yield next(v for k, v in entry.items() if k != "cls"), entry["cls"]
    bad.add(owner, "image without a label or label without an image", len(pending))


def read_shard(ref: ShardRef, task: Task, bad: BadSamples) -> Iterator[tuple[bytes, int]]:
    """The usable samples (encoded image, label) of one shard; everything else is counted in ``bad``
    against ``ref.owner``. Never raises for what the file holds: a shard that cannot be read at all
    counts all its declared images, one that breaks off counts those it did not deliver."""
    good, bad_before = 0, bad.count(ref.owner)
    try:
        for data, label_text in _tar_samples(ref.path, ref.images, task, bad, ref.owner):
            if good >= ref.images:  # never more than the manifest declared (and the run planned for)
                bad.add(ref.owner, "more samples than the manifest declares; the rest of the shard ignored")
                break
            problem = sample_problem(data, label_text, task)
            if problem is not None:
                bad.add(ref.owner, problem)
                continue
            good += 1
            yield data, int(label_text)
        why = "fewer samples than the manifest declares"
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        why = f"shard unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    undelivered = ref.images - good - (bad.count(ref.owner) - bad_before)
    bad.add(ref.owner, why, undelivered)


def check_shards(shards: Iterable[ShardRef], task: Task) -> BadSamples:
    """Read every sample of ``shards`` as training will and count what cannot train, per owner;
    nothing is kept in memory."""
    bad = BadSamples()
    for ref in shards:
        for _ in read_shard(ref, task, bad):
            pass
    return bad


class UnusableData(ValueError):
    """Samples failed to decode one after another: the message names their owners."""


class EncodedImages(torch.utils.data.Dataset):
    """Samples of some shards: (uint8 tensor C x H x W, label, group), group = index of its key id
    (or owner, for plain data) in ``groups``.

    With ``task``, unusable samples are skipped and counted in ``self.bad`` (see :func:`read_shard`);
    a sample that still fails to decode later is counted in ``self.decode_failures`` and replaced by
    the next one that decodes. Without it every shard must be sound (the owner's own outbox)."""

    def __init__(self, shards: list[ShardRef], groups: list[str], task: Task | None = None) -> None:
        self.encoded: list[bytes] = []
        self.bad, self.decode_failures = BadSamples(), BadSamples()
        self.owners = sorted({ref.owner for ref in shards})
        self._expected = None if task is None else _pixel_shape(task)
        self._undecodable: set[int] = set()
        labels, group_ids, owner_ids = [], [], []
        for ref in shards:
            group, owner = groups.index(ref.key_id or ref.owner), self.owners.index(ref.owner)
            if task is None:
                samples: Iterable[tuple[bytes, int]] = ((d, lab) for _, d, lab in iter_samples(Path(ref.path)))
            else:
                samples = read_shard(ref, task, self.bad)
            for data, label in samples:
                self.encoded.append(data)
                labels.append(label)
                group_ids.append(group)
                owner_ids.append(owner)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.groups = torch.tensor(group_ids, dtype=torch.long)
        self.owner_ids = owner_ids

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int):
        for j in ((i + step) % len(self) for step in range(min(DECODE_RETRIES, len(self)))):
            if j in self._undecodable:
                continue
            try:
                img = self._decode(j)
            except Exception as exc:  # any decoder error on hostile bytes: skip the sample, not the run
                self._undecodable.add(j)
                self.decode_failures.add(self.owners[self.owner_ids[j]], f"decode failed ({type(exc).__name__})")
                continue
            return torch.from_numpy(img), self.labels[j], self.groups[j]
        raise UnusableData(f"{DECODE_RETRIES} samples in a row from sample {i} on failed to decode (owners: "
                           f"{', '.join(sorted(self.decode_failures.by_owner))})")

    def _decode(self, i: int) -> np.ndarray:
        img = decode(self.encoded[i])
        if self._expected is not None and (img.shape != self._expected or img.dtype != np.uint8):
            raise CodecError(f"decoded to {img.shape} {img.dtype}, expected {self._expected} uint8")
        return img[None] if img.ndim == 2 else np.ascontiguousarray(img.transpose(2, 0, 1))


def _pixel_shape(task: Task) -> tuple[int, ...]:
    """The array shape ``decode`` gives for a sound image of ``task``."""
    shape = task.model_input
    return shape.shape + ((3,) if shape.in_chans == 3 else ())


def group_names(shards: list[ShardRef]) -> list[str]:
    """Stable list of key ids (or owners for plain data): the group index used everywhere."""
    return sorted({ref.key_id or ref.owner for ref in shards})


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)
