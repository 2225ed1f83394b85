"""File sizes of plain vs EtC images (the paper's Table IV) on the CIFAR-10 training JPEGs.

Every image is loaded with owners.images.load_rgb(path, 32), encrypted with a fixed key
(colour: block 16, gray: block 8) and encoded with protocol.codec.Codec. PSNR is the mean over
images of the per-image PSNR (protocol.codec.psnr) of decode(encode(encrypt(x))) decrypted, against
x, at JPEG q85; an image that comes back identical (infinite PSNR) is counted, not averaged.
Issue target: colour EtC at q85 at most 1% larger than plain (paper: 0.4%).

    python -m benchmarks.file_sizes [--limit 500] [--json results/file_sizes.json]
"""
from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks._common import report

DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/cifar10-jpeg/train"
SECRET = bytes(range(32))
# row name -> (cipher scheme or None, chroma, columns). Columns: (label, format, quality).
COLUMNS = {"jpeg q85": ("jpeg", 85), "jpeg q80": ("jpeg", 80), "png": ("png", 85)}
ROWS = {
    "plain": (None, "420", ("jpeg q85", "jpeg q80", "png")),
    "colour EtC (block 16)": ("color", "420", ("jpeg q85", "jpeg q80", "png")),
    "grayscale EtC (block 8)": ("gray", "420", ("jpeg q85", "jpeg q80", "png")),
    "plain, 4:4:4": (None, "444", ("jpeg q85", "jpeg q80")),
    "colour EtC (block 16), 4:4:4": ("color", "444", ("jpeg q85", "jpeg q80")),
}
PSNR_COLUMN = "jpeg q85"


def measure_chunk(paths: list[Path]) -> dict:
    """Total bytes per (row, column), summed finite PSNR and count of identical images per row, for
    one chunk of files."""
    import numba

    from owners.cipher import BlockCipher, CipherGeometry
    from owners.images import load_rgb
    from protocol.codec import Codec, decode, psnr

    numba.set_num_threads(1)  # one process per core already
    ciphers = {s: BlockCipher(SECRET, CipherGeometry(32, 32, b, s)) for s, b in (("color", 16), ("gray", 8))}
    batch = np.stack([load_rgb(p, 32)[0] for p in paths])
    stored = {s: c.encrypt(batch) for s, c in ciphers.items()}
    stored[None] = batch
    sizes, psnr_sum, identical = {}, {}, {}
    for row, (scheme, chroma, columns) in ROWS.items():
        for col in columns:
            fmt, quality = COLUMNS[col]
            codec = Codec(fmt, quality, chroma)
            encoded = [codec.encode(img) for img in stored[scheme]]
            sizes[row, col] = sum(map(len, encoded))
            if col == PSNR_COLUMN:
                back = np.stack([decode(e) for e in encoded])
                restored = back if scheme is None else ciphers[scheme].decrypt(back)
                values = [psnr(r, x) for r, x in zip(restored, batch)]
                psnr_sum[row] = sum(v for v in values if math.isfinite(v))
                identical[row] = sum(not math.isfinite(v) for v in values)
    return {"count": len(paths), "sizes": sizes, "psnr_sum": psnr_sum, "identical": identical}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with <class>/*.jpg")
    ap.add_argument("--limit", type=int, default=0, help="images per class (0: all)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--chunk", type=int, default=500, help="images per task")
    ap.add_argument("--json", help="also write the results as JSON to this path")
    args = ap.parse_args()

    files = []
    for folder in sorted(p for p in args.data.iterdir() if p.is_dir()):
        found = sorted(folder.glob("*.jpg"))
        files += found[: args.limit] if args.limit else found
    chunks = [files[i : i + args.chunk] for i in range(0, len(files), args.chunk)]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        parts = list(pool.map(measure_chunk, chunks))
    seconds = time.perf_counter() - started

    count = sum(p["count"] for p in parts)
    total = {k: sum(p["sizes"][k] for p in parts) for k in parts[0]["sizes"]}
    identical = {r: sum(p["identical"][r] for p in parts) for r in ROWS}
    psnr_mean = {r: sum(p["psnr_sum"][r] for p in parts) / max(1, count - identical[r]) for r in ROWS}
    header = [*[f"{c} MB" for c in COLUMNS], *[f"{c} / plain" for c in COLUMNS],
              f"PSNR {PSNR_COLUMN} dB"]
    rows = []
    for row, (_, _, columns) in ROWS.items():
        mb = [total[row, c] / 1e6 if c in columns else "-" for c in COLUMNS]
        ratio = [total[row, c] / total["plain", c] if c in columns else "-" for c in COLUMNS]
        rows.append([row, *mb, *[f"{r:.4f}" if r != "-" else r for r in ratio], psnr_mean[row]])
    notes = [
        f"{count} images ({'all' if not args.limit else f'{args.limit} per class'}) from {args.data}, "
        f"loaded at 32x32; {seconds:.0f} s with {args.workers} workers.",
        "Ratios are against the plain 4:2:0 row. PSNR: mean per-image PSNR of the decoded (and "
        "decrypted) image vs the loaded 32x32 image. Gray rows include the YCbCr round trip.",
        "Target (issue): colour EtC jpeg q85 / plain <= 1.01 (paper: 1.004).",
    ]
    if any(identical.values()):
        notes.append("Images decoded identical to the loaded image (infinite PSNR, left out of the mean): "
                     + ", ".join(f"{r} {n}" for r, n in identical.items() if n))
    report("File sizes (Table IV form)", ["row", *header], rows, notes, args.json,
           extra={"images": count, "seconds": seconds, "identical_images": identical})


if __name__ == "__main__":
    main()
