"""The product's attacks on every geometry it offers: what a cloud recovers from the uploads.

For each geometry (scheme, image size, block) and each number N of encrypted images the cloud
holds, it encrypts N held-out CIFAR-10 train images (../shared/data/cifar10-jpeg/train, resized
with the product's loader: 224x224 is upsampled) under fresh random keys, stores them as
`owner-agent encrypt` does (JPEG q85 unless --format png), runs the ciphertext-only attack with
a public prior built from other CIFAR-10 images (disjoint from the attacked ones), and scores it
against the truth: the fraction of the key recovered (up to one mirror flip), images decrypted
exactly (and up to that flip), SSIM/PSNR of the reconstructions, CPU seconds. The
known-plaintext attack (M pairs) and the one-image-at-a-time attack are measured the same way.
Figures are means over --keys keys. With --per-image-keys every image is encrypted under its own
fresh random key (Task.key_mode per-image) and each attack is scored per image against that
image's own key (owners/attacks/per_image_keys.py). The gray scheme's one-image-at-a-time rows
also score the Y plane alone (owners/attacks/luma.py: its layout up to a turn, its SSIM; shown as
"(Y ...)"), and their verdict takes the better of the RGB and the Y figures: a recognisable grey
picture is a privacy loss even with wrong colours. --within-class START:END attacks (and builds the
prior from) only the images whose index in their class folder is in that range.
"""
from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks._common import ROOT, report
from owners.attacks.ciphertext_only import ciphertext_only_attack
from owners.attacks.known_plaintext import known_plaintext_attack
from owners.attacks.luma import luma_figures
from owners.attacks.per_image import per_image_attack
from owners.attacks.per_image_keys import encrypt_each, score_each
from owners.attacks.prior import NaturalImagePrior
from owners.attacks.scoring import score_attack
from owners.audit import as_uploaded, verdict_of
from owners.cipher import BlockCipher, CipherGeometry
from owners.images import load_rgb, scan_image_folder
from protocol.codec import Codec

KP_SCORED = 50  # known plaintext: other images the schedule is scored on (and, in the "+ uploads" row, used)
FIELDS = ("key", "arrangement", "exact", "exact_up_to_flip", "ssim", "psnr", "luma_layout", "luma_ssim")


def load(items, size: int) -> np.ndarray:
    return np.stack([load_rgb(item.path, size)[0] for item in items])


def measure(attack, geometry: CipherGeometry, codec: Codec, plain: np.ndarray, keys: int,
            per_image_keys: bool = False) -> dict:
    """Mean score over ``keys`` fresh keys (or, with ``per_image_keys``, as many draws of one fresh
    key per image); ``attack(stored, truths) -> scores``, ``truths`` the true schedule of each image."""
    runs = []
    for _ in range(keys):
        if per_image_keys:
            stored, truths = encrypt_each(plain, geometry, codec)
        else:
            cipher = BlockCipher(secrets.token_bytes(32), geometry)
            stored, truths = as_uploaded(cipher, codec, plain), [cipher.schedule] * len(plain)
        start = time.process_time()
        scores = attack(stored, truths)
        seconds = time.process_time() - start
        run = {f: float(np.mean([np.nan if getattr(s, f, None) is None else getattr(s, f) for s in scores]))
               for f in FIELDS}
        seen = {**run, "arrangement": _better(run["arrangement"], run["luma_layout"]),
                "ssim": _better(run["ssim"], run["luma_ssim"])}  # what the cloud sees best decides
        runs.append({**run, "cpu_s": seconds, "verdict": verdict_of(SimpleNamespace(**seen))})
    mean = {f: float(np.mean([r[f] for r in runs])) for f in (*FIELDS, "cpu_s")}
    mean["verdict"] = max((r["verdict"] for r in runs), key=("holds", "weak", "broken").index)  # the worst key
    return mean


def _better(a: float, b: float) -> float:
    """The larger of two figures, either of which may be NaN (not measured)."""
    return a if np.isnan(b) else b if np.isnan(a) else max(a, b)


def ciphertext_only(prior: NaturalImagePrior, plain: np.ndarray, geometry: CipherGeometry, per_image_keys: bool):
    """The pooled attack; under per-image keys its one schedule is scored against each image's own."""
    def attack(stored, truths):
        estimate = ciphertext_only_attack(stored, geometry, prior)
        if per_image_keys:
            return [score_each([estimate] * len(stored), truths, geometry, stored, plain)]
        return [score_attack(estimate, truths[0], geometry, stored, plain)]
    return attack


def known_plaintext(pairs: int, plain: np.ndarray, geometry: CipherGeometry, per_image_keys: bool, codec: Codec,
                    uploads: bool):
    """Schedule from the first ``pairs`` pairs (re-encoded with the task's codec; with ``uploads``, what
    that leaves open settled by the other uploads), scored on every other image (against its own key)."""
    def attack(stored, truths):
        others = stored[pairs:] if uploads else None
        estimate = known_plaintext_attack(plain[:pairs], stored[:pairs], geometry, codec, others)
        if per_image_keys:
            rest = len(stored) - pairs
            return [score_each([estimate] * rest, truths[pairs:], geometry, stored[pairs:], plain[pairs:])]
        return [score_attack(estimate, truths[0], geometry, stored[pairs:], plain[pairs:])]
    return attack


def one_at_a_time(prior: NaturalImagePrior, plain: np.ndarray, geometry: CipherGeometry):
    def attack(stored, truths):
        estimates = per_image_attack(stored, geometry, prior)
        score = score_each(estimates, truths, geometry, stored, plain)
        if geometry.scheme != "gray":
            return [score]
        layout, y_ssim = luma_figures(estimates, list(truths), geometry, stored, plain)
        return [SimpleNamespace(**score.__dict__, luma_layout=layout, luma_ssim=y_ssim)]
    return attack


def row(name: str, geometry: CipherGeometry, codec: Codec, held: str, m: dict) -> list:
    g = geometry
    arrangement = "-" if np.isnan(m["arrangement"]) else f"{m['arrangement']:.0%}"
    if not np.isnan(m["luma_layout"]):
        arrangement = f"{m['luma_layout']:.0%} (Y)"
    ssim = f"{m['ssim']:.2f}" + ("" if np.isnan(m["luma_ssim"]) else f" (Y {m['luma_ssim']:.2f})")
    return [name, f"{g.scheme} {g.height}x{g.width} /{g.block}", codec.format, held, f"{m['key']:.0%}", arrangement,
            f"{m['exact']:.0%}", f"{m['exact_up_to_flip']:.0%}", ssim, f"{m['psnr']:.1f}",
            f"{m['cpu_s']:.2f}", m["verdict"]]


def index_in_class(items) -> list[int]:
    """Each image's index among its class's images, in the folder's (sorted) order."""
    seen: dict[int, int] = {}
    out = []
    for item in items:
        out.append(seen.get(item.label, 0))
        seen[item.label] = out[-1] + 1
    return out


def parse_geometries(text: str) -> list[CipherGeometry]:
    out = []
    for spec in text.split(","):
        scheme, size, block = spec.split(":")
        out.append(CipherGeometry(int(size), int(size), int(block), scheme))
    return out


def geometry_rows(geometry: CipherGeometry, args, prior_items, attack_items) -> list[list]:
    codec = Codec(args.format, args.quality)
    counts = args.counts_large if geometry.height > 64 else args.counts
    counts = [int(c) for c in counts.split(",")]
    plain = load(attack_items[:max(counts)], geometry.height)
    prior = NaturalImagePrior.from_images(load(prior_items, geometry.height))
    rows, each = [], args.per_image_keys
    mode = " (per-image keys)" if each else ""
    for m in (int(p) for p in args.pairs.split(",") if p):
        for uploads in (False, True):
            result = measure(known_plaintext(m, plain[:m + KP_SCORED], geometry, each, codec, uploads), geometry,
                             codec, plain[:m + KP_SCORED], args.keys, each)
            held = f"{m} pair(s)" + (f" + {KP_SCORED} uploads" if uploads else "")
            rows.append(row("known plaintext" + mode, geometry, codec, held, result))
    for n in counts if args.ciphertext_only else []:
        result = measure(ciphertext_only(prior, plain[:n], geometry, each), geometry, codec, plain[:n], args.keys,
                         each)
        rows.append(row("ciphertext only" + mode, geometry, codec, str(n), result))
    if args.per_image:
        k = args.per_image
        result = measure(one_at_a_time(prior, plain[:k], geometry), geometry, codec, plain[:k], args.keys, each)
        rows.append(row("one image at a time" + mode, geometry, codec, f"1 (x{k})", result))
    for r in rows:
        print(" | ".join(str(v) for v in r), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg/train"))
    parser.add_argument("--geometries", default="color:32:16,color:32:8,gray:32:8,color:64:16,gray:64:8,"
                                                "color:224:16,gray:224:8", help="scheme:size:block,...")
    parser.add_argument("--counts", default="30,100,1000", help="images the cloud holds (sizes <= 64)")
    parser.add_argument("--counts-large", default="100,500", help="images the cloud holds (larger sizes)")
    parser.add_argument("--pairs", default="1,3", help="known-plaintext pairs ('' for none)")
    parser.add_argument("--no-ciphertext-only", dest="ciphertext_only", action="store_false",
                        help="skip the ciphertext-only attack (e.g. to measure one image at a time alone)")
    parser.add_argument("--per-image", type=int, default=20, help="images attacked one at a time")
    parser.add_argument("--keys", type=int, default=3, help="fresh random keys per measurement")
    parser.add_argument("--per-image-keys", action="store_true",
                        help="every image under its own fresh key (Task.key_mode per-image); scored per image")
    parser.add_argument("--prior-images", type=int, default=2000, help="public prior: CIFAR-10 images not attacked")
    parser.add_argument("--format", default="jpeg", choices=("jpeg", "png"))
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--within-class", default="",
                        help="START:END: only images whose index in their class folder is in [START, END) (e.g. "
                             "500:4900 leaves out the frontier's training and test images)")
    parser.add_argument("--json")
    args = parser.parse_args()
    items = list(scan_image_folder(Path(args.data)).images)
    if args.within_class:
        start, sep, end = args.within_class.partition(":")
        if not (sep and start.isdigit() and end.isdigit() and int(start) < int(end)):
            parser.error(f"--within-class {args.within_class!r}: expected START:END with 0 <= START < END")
        start, end = int(start), int(end)
        items = [it for it, i in zip(items, index_in_class(items)) if start <= i < end]
    np.random.default_rng(0).shuffle(items)
    prior_items, attack_items = items[:args.prior_images], items[args.prior_images:]
    rows = []
    for geometry in parse_geometries(args.geometries):
        rows += geometry_rows(geometry, args, prior_items, attack_items)
    header = ["attack", "geometry", "codec", "images the cloud holds", "key recovered", "layout up to a turn",
              "images exact",
              "exact up to a flip", "SSIM", "PSNR dB", "CPU s", "verdict"]
    notes = [f"means over {args.keys} random keys; attacked images are CIFAR-10 train images disjoint from the "
             f"{args.prior_images}-image public prior; key recovered = blocks with position, orientation, "
             "negation (and channel order) all right, up to one whole-image mirror flip; layout up to a turn = blocks "
             "placed right up to one turn/flip of the whole image (square grids); CPU s = process CPU time "
             "of the attack alone (2 shared cores)"]
    report("Privacy audit: the product's attacks per geometry", header, rows, notes, args.json)


if __name__ == "__main__":
    main()
