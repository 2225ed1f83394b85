"""Training images/s on encrypted vs plain shards through the same loop (the ratio should be 1.0).

The same images are prepared twice, plain and colour-EtC encrypted, then fed to the product's
training step (decode, normalise, forward, backward, AdamW) with identical settings and no
augmentation, alternating runs. Encryption changes pixel values, not the work.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks._common import ROOT, report
from benchmarks.train_accuracy import KEY, subset
from mlcore.data import EncodedImages, group_names, outbox_refs
from mlcore.loop import make_optimizer, train_one_epoch
from orchestrator.config import TrainingConfig
from orchestrator.training import TrainJob, make_model
from owners.encrypt import EncryptSettings, encrypt_folder
from protocol.task import Task


def loaders(work: Path, classes: tuple[str, ...], batch_size: int) -> dict[str, torch.utils.data.DataLoader]:
    """The images of ``work/imgs`` prepared plain and colour-EtC encrypted, one loader each."""
    out = {}
    for name, scheme, key in (("plain", "plain", None), ("colour EtC", "color", KEY)):
        encrypt_folder(work / "imgs", work / scheme, key, EncryptSettings(task=Task(classes, scheme=scheme)),
                       progress=False)
        refs = list(outbox_refs(work / scheme, "o"))
        out[name] = torch.utils.data.DataLoader(EncodedImages(refs, group_names(refs)), batch_size=batch_size,
                                                shuffle=True, drop_last=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg/train"))
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default="convmixer_256_8_p4_k9")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    speeds = {"plain": [], "colour EtC": []}
    try:
        classes = subset(Path(args.data), work / "imgs", 0, args.per_class)
        settings = TrainingConfig(model=args.model, batch_size=64)
        by_data = loaders(work, classes, settings.batch_size)
        # one job for both: a "color" task means no crop/flip, so the loop does identical work
        job = TrainJob("bench", Task(classes, scheme="color"), (), (), settings, str(work), "bench")
        for _ in range(args.repeat):
            for name, loader in by_data.items():
                model = make_model(job).to(memory_format=torch.channels_last)
                opt, sched = make_optimizer(model, settings, len(loader))
                stats = train_one_epoch(model, loader, opt, sched, settings, job.task, torch.device("cpu"),
                                        torch.Generator())
                speeds[name].append(stats["images_per_s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain, enc = statistics.median(speeds["plain"]), statistics.median(speeds["colour EtC"])
    report("Training throughput, encrypted vs plain shards",
           ["data", "images/s (median)", "all runs"],
           [["plain", plain, ", ".join(f"{v:.0f}" for v in speeds["plain"])],
            ["colour EtC", enc, ", ".join(f"{v:.0f}" for v in speeds["colour EtC"])]],
           [f"{args.model}, batch 64, fp32, 2 threads, {args.per_class * 10} images per epoch, {args.repeat} "
            f"alternating epochs each. Ratio encrypted / plain: {enc / plain:.3f} (target >= 0.95)."],
           args.json, extra={"ratio": enc / plain})


if __name__ == "__main__":
    main()
