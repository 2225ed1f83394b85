"""What looking inside a shard costs the cloud: ``inspect_shard`` (every member name, label and
image decoded and checked, ``protocol/shards.py``) on one shard of real encrypted CIFAR-10 images.

Usage: python -m benchmarks.shard_inspection [--data DIR] [--per-class 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, machine_facts
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.shards import Manifest, inspect_shard
from protocol.task import Task


def slice_of(data: Path, per_class: int, folder: Path) -> Task:
    """``per_class`` images of every class of ``data``, symlinked into ``folder``."""
    classes = tuple(sorted(p.name for p in data.iterdir() if p.is_dir()))
    for name in classes:
        (folder / name).mkdir(parents=True)
        for f in sorted((data / name).iterdir())[:per_class]:
            (folder / name / f.name).symlink_to(f)
    return Task(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg/train"))
    parser.add_argument("--per-class", type=int, default=1000, help="images per class (default 1000)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        task = slice_of(Path(args.data), args.per_class, Path(tmp) / "data")
        out = Path(tmp) / "outbox"
        encrypt_folder(Path(tmp) / "data", out, OwnerKey("bench", bytes(32)),
                       EncryptSettings(task=task, shard_images=len(task.classes) * args.per_class), progress=False)
        shard = Manifest.load(out).shards[0]
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            inspect_shard(out / shard.name, task, shard.count)
            times.append(time.perf_counter() - started)
    best, median = min(times), sorted(times)[len(times) // 2]
    print(f"shard of {shard.count} images ({shard.bytes / 1e6:.1f} MB, 32x32 colour EtC, JPEG q85): inspect best "
          f"{best:.2f} s, median {median:.2f} s ({shard.count / best:.0f} images/s, one core)")
    print(f"reproduce: python -m benchmarks.shard_inspection --per-class {args.per_class} --repeat {args.repeat}")
    print(f"machine: {', '.join(f'{k}={v}' for k, v in machine_facts().items())}")


if __name__ == "__main__":
    main()
