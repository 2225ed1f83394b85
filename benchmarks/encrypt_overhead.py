"""End-to-end cost of owners.encrypt.encrypt_folder with a colour key vs the plain scheme.

A temporary image folder DIR/<class>/ of symlinks to the first --per-class CIFAR-10 training
JPEGs is prepared into temporary outboxes, alternating plain and colour runs, after one untimed
warm-up of each (numba cache load, page cache). Issue target: encrypt at most 15% slower than plain.

    python -m benchmarks.encrypt_overhead [--per-class 1000] [--runs 3] [--json results/encrypt_overhead.json]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks._common import report
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from protocol.task import Task

DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/cifar10-jpeg/train"
KEY = OwnerKey(name="bench", secret=bytes(range(32)))
MODES = {"plain": (None, "plain"), "colour EtC": (KEY, "color")}  # mode -> (key, task.scheme)


def link_folder(src: Path, dst: Path, per_class: int) -> int:
    count = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True)
        for f in sorted(folder.glob("*.jpg"))[:per_class]:
            (dst / folder.name / f.name).symlink_to(f.resolve())
            count += 1
    return count


def run_once(data: Path, work: Path, mode: str) -> tuple[float, int]:
    key, scheme = MODES[mode]
    classes = tuple(sorted(p.name for p in data.iterdir() if p.is_dir()))  # what encrypt defaults to
    settings = EncryptSettings(task=Task(classes, scheme=scheme))  # 32x32, block 16, JPEG q85 4:2:0
    out = work / "outbox"
    try:
        summary = encrypt_folder(data, out, key, settings, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return summary.seconds, summary.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with <class>/*.jpg")
    ap.add_argument("--per-class", type=int, default=1000, help="images per class")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per mode (alternating)")
    ap.add_argument("--json", help="also write the results as JSON to this path")
    args = ap.parse_args()

    times: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="etc-bench-") as tmp:
        work, small = Path(tmp), Path(tmp) / "warmup"
        total = link_folder(args.data, work / "images", args.per_class)
        link_folder(args.data, small, 20)
        for mode in MODES:
            run_once(small, work, mode)
        for _ in range(args.runs):
            for mode in MODES:
                seconds, images = run_once(work / "images", work, mode)
                assert images == total, f"{mode}: {images} of {total} images written"
                times[mode].append(seconds)

    header = ["mode", "images", "best s", "median s", "images/s (best)", "overhead vs plain (best)",
              "overhead vs plain (median)"]
    rows = []
    for mode, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        rows.append([mode, total, best, med, total / best,
                     f"{100 * (best / min(times['plain']) - 1):+.1f}%",
                     f"{100 * (med / statistics.median(times['plain']) - 1):+.1f}%"])
    notes = [
        f"runs per mode: {args.runs}, alternating; all seconds: "
        + "; ".join(f"{m} {', '.join(f'{t:.2f}' for t in ts)}" for m, ts in times.items()),
        "Settings: 32x32, JPEG q85 4:2:0, default chunk and workers. Target (issue): overhead <= +15%.",
    ]
    report("encrypt_folder: colour EtC vs plain", header, rows, notes, args.json,
           extra={"seconds": times})


if __name__ == "__main__":
    main()
