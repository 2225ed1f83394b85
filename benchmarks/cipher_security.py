"""How much of the plain image's structure survives encryption: SSIM over many keys, key space.

For every (scheme, size) it encrypts real photos (CIFAR-10 JPEGs from ../shared/data/cifar10-jpeg,
or the shipped sample) under many random keys and reports the SSIM between the stored encrypted image (after
the JPEG round trip, q85) and the plain image in the same representation (colour: RGB; gray:
the stacked YCbCr plane). Also the number of blocks and log2 of the key space per geometry.
"""
from __future__ import annotations

import argparse
import secrets
from pathlib import Path

import numpy as np

from benchmarks._common import ROOT, report
from benchmarks.metrics import ssim
from owners.cipher import BlockCipher, CipherGeometry, rgb_to_stacked_ycbcr
from owners.images import load_rgb, scan_image_folder
from protocol.codec import Codec, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg/train"))
    parser.add_argument("--images", type=int, default=200, help="images per measurement")
    parser.add_argument("--keys", type=int, default=20, help="random keys per geometry")
    parser.add_argument("--json")
    args = parser.parse_args()
    data = Path(args.data) if Path(args.data).is_dir() else ROOT / "examples/cifar10-sample/train"
    items = scan_image_folder(data).images
    items = items[:: max(1, len(items) // args.images)][: args.images]
    codec = Codec("jpeg", 85)
    rows = []
    for size in (32, 224):
        plain = np.stack([load_rgb(item.path, size)[0] for item in items])
        for scheme, block in (("color", 16), ("gray", 8)):
            geometry = CipherGeometry(size, size, block, scheme)
            reference = plain if scheme == "color" else rgb_to_stacked_ycbcr(plain)
            per_key = []
            for _ in range(args.keys):
                cipher = BlockCipher(secrets.token_bytes(32), geometry)
                stored = np.stack([decode(codec.encode(e)) for e in cipher.encrypt(plain)])
                per_key.append(float(ssim(reference, stored, window=7).mean()))
            # chance level: SSIM between unrelated plain images (each against the next one)
            unrelated = float(ssim(reference, np.roll(reference, 1, axis=0), window=7).mean())
            rows.append([f"{size}x{size}", scheme, block, geometry.num_blocks, round(geometry.key_space_bits),
                         float(np.mean(per_key)), float(np.percentile(per_key, 90)), float(max(per_key)), unrelated])
    report("Structure left after encryption (SSIM, encrypted vs plain)",
           ["image", "scheme", "block", "blocks", "log2 key space", "mean SSIM", "p90 over keys", "max over keys",
            "SSIM of unrelated plain images"],
           rows,
           [f"{len(items)} images from {data}, {args.keys} random keys per row, JPEG q85 round trip, "
            "SSIM with a 7-pixel Gaussian window (sigma 1.5), colour: mean over RGB channels.",
            "The last column is the chance level: two unrelated plain images. 224x224 images here are "
            "CIFAR-10 upsampled, hence smooth; SSIM rates flat regions as similar whatever their place.",
            "Target (issue): mean SSIM under 0.1. A brute-force attack needs about 2^(log2 key space) trials "
            "only if nothing better exists; jigsaw-puzzle solvers attack EtC with far fewer."],
           args.json)


if __name__ == "__main__":
    main()
