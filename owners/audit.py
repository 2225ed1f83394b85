"""``owner-agent audit``: the product's attacks, run here on the owner's own images and key.

Nothing leaves the machine. The owner's images are loaded at the task's size, encrypted with the
owner's key and passed through the stored codec exactly as an upload would be; then each attack
runs on what the cloud would hold, and is scored against the truth the owner alone knows (the
key's schedule and the plain images). A fifth of the images (every fifth) is held out as the
attacker's public natural-image prior and never attacked.

Verdict per attack (the thresholds, written down once):
    broken  the attack recovers >= 50% of the key, or decrypts >= 50% of the images exactly (up
            to a mirror image), or its reconstructions reach SSIM >= 0.6 (content recognisable);
    weak    >= 10% of the key, or >= 5% of images exact, or SSIM >= 0.3, or >= 50% of the
            blocks in place up to a turn of the whole image (the layout is recognisable);
    holds   below all of these.
The overall verdict is the worst over the attacks that need no plain image (ciphertext-only and
per-image): what a cloud can do with the uploads alone. Known plaintext is reported apart: it is
always `broken` (one leaked pair reveals the schedule) and says what a leak costs; it re-encodes
candidates with the task's codec and uses up to KP_UPLOADS other uploads, as the cloud can.

Gray scheme: the layout (arr~) is the Y plane's, which has a square grid where the cipher plane has
none, and the verdict takes the better of the RGB and the Y plane's SSIM (``owners/attacks/luma.py``):
a grey picture recovered with wrong colours is a privacy loss all the same.

With per-image keys (``Task.key_mode = "per-image"``, ``owner-agent audit --per-image-keys``) every
image is encrypted under its own fresh random key instead of the owner's, the same attacks run on
what the cloud would then hold, and each is scored per image against that image's own key
(:mod:`owners.attacks.per_image_keys`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from owners.attacks.ciphertext_only import ciphertext_only_attack
from owners.attacks.common import ScheduleCipher
from owners.attacks.known_plaintext import known_plaintext_attack
from owners.attacks.luma import luma_figures
from owners.attacks.per_image import per_image_attack
from owners.attacks.per_image_keys import encrypt_each, score_each
from owners.attacks.prior import NaturalImagePrior
from owners.attacks.scoring import Score, score_attack
from owners.cipher import BlockCipher, CipherGeometry
from owners.errors import OwnerError
from owners.images import BadImage, load_rgb, scan_image_folder
from protocol.codec import Codec, decode
from protocol.privacy import BROKEN, VERDICTS, WEAK  # the thresholds the owner commands' verdict uses too

KP_UPLOADS = 200  # known plaintext: other uploads (the cloud holds them) that settle what the pairs leave open
PRIOR_EVERY = 5  # every fifth image is the attacker's prior, never attacked
MIN_ATTACKED = 10


class AuditError(OwnerError):
    """The audit cannot run on this folder (too few readable images, a bad setting)."""


@dataclass
class AttackRow:
    attack: str  # "known plaintext", "ciphertext only", "one image at a time"
    images: int  # the images the attacker holds (pairs for known plaintext)
    scored: int  # the images the reconstruction is scored on
    score: Score
    seconds: float
    verdict: str
    luma_ssim: float | None = None  # gray scheme: SSIM of the Y plane alone

    def as_dict(self) -> dict:
        luma = {} if self.luma_ssim is None else {"luma_ssim": round(self.luma_ssim, 4)}
        return {"attack": self.attack, "images": self.images, "scored": self.scored,
                "seconds": round(self.seconds, 3), "verdict": self.verdict, **self.score.as_dict(), **luma}


@dataclass
class AuditReport:
    geometry: CipherGeometry
    codec: Codec
    attacked: int
    prior_images: int
    per_image_keys: bool = False
    rows: list[AttackRow] = field(default_factory=list)
    picture: Path | None = None

    @property
    def verdict(self) -> str:
        uploads_only = [r.verdict for r in self.rows if r.attack != "known plaintext"]
        return max(uploads_only, key=VERDICTS.index) if uploads_only else "broken"

    def as_dict(self) -> dict:
        g = self.geometry
        return {"geometry": {"size": g.height, "block": g.block, "scheme": g.scheme},
                "codec": self.codec.__dict__, "attacked_images": self.attacked, "prior_images": self.prior_images,
                "key_mode": "per-image" if self.per_image_keys else "owner",
                "verdict": self.verdict, "thresholds": {"broken": BROKEN, "weak": WEAK},
                "attacks": [r.as_dict() for r in self.rows],
                "picture": str(self.picture) if self.picture else None}


def verdict_seen(score: Score, luma_ssim: float | None = None) -> str:
    """The verdict on what the cloud sees best: for the gray scheme (``luma_ssim``, the Y plane's SSIM)
    a grey picture counts as much as the colour one."""
    return verdict_of(score if luma_ssim is None else dataclasses.replace(score, ssim=max(score.ssim, luma_ssim)))


def verdict_of(score: Score) -> str:
    layout = getattr(score, "arrangement", None)
    values = {"key": score.key, "exact": score.exact_up_to_flip, "ssim": score.ssim,
              "layout": -1.0 if layout is None or layout != layout else layout}  # None/NaN: no square grid
    for name, bar in (("broken", BROKEN), ("weak", WEAK)):
        if any(values[k] >= bar[k] for k in bar):
            return name
    return "holds"


def load_images(data: Path, size: int, limit: int) -> np.ndarray:
    """Up to ``limit`` readable images of the folder, spread over its classes, at ``size``."""
    scan = scan_image_folder(data)
    step = max(1, len(scan.images) // limit)
    picked = []
    for item in scan.images[::step][:limit]:
        try:
            picked.append(load_rgb(item.path, size)[0])
        except (BadImage, OSError):
            continue
    if len(picked) < MIN_ATTACKED + 2:
        raise AuditError(f"{data}: {len(picked)} readable images; the audit needs at least {MIN_ATTACKED + 2}")
    # A fixed shuffle: the first N images (what an attack on N uploads sees) mix the classes.
    return np.stack(picked)[np.random.default_rng(0).permutation(len(picked))]


def as_uploaded(cipher: BlockCipher, codec: Codec, images: np.ndarray) -> np.ndarray:
    """Encrypt and pass through the stored codec, as an upload would."""
    return np.stack([decode(codec.encode(e)) for e in cipher.encrypt(images)])


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


@dataclass(frozen=True)
class AuditPlan:
    counts: tuple[int, ...] = (30, 100, 1000)  # ciphertext-only: images the cloud holds (capped by the folder)
    pairs: tuple[int, ...] = (1, 3)  # known plaintext: plain/encrypted pairs
    per_image: int = 20  # images attacked one at a time
    limit: int = 1250  # images read from the folder (a fifth of them become the prior)


def run_audit(data: Path, secret: bytes, geometry: CipherGeometry, codec: Codec, plan: AuditPlan = AuditPlan(),
              picture: Path | None = None, prior_data: Path | None = None, per_image_keys: bool = False) -> AuditReport:
    """Every attack on the owner's images under the owner's key (or, with ``per_image_keys``, each
    image under its own fresh random key); the table and (optionally) the PNG."""
    images = load_images(data, geometry.height, plan.limit)
    if prior_data is not None:
        prior_images, attacked = load_images(prior_data, geometry.height, plan.limit), images
    else:
        held_out = np.arange(len(images)) % PRIOR_EVERY == PRIOR_EVERY - 1
        prior_images, attacked = images[held_out], images[~held_out]
    prior = NaturalImagePrior.from_images(prior_images)
    if per_image_keys:
        stored, truths = encrypt_each(attacked, geometry, codec)
    else:
        cipher = BlockCipher(secret, geometry)
        stored, truths = as_uploaded(cipher, codec, attacked), [cipher.schedule] * len(attacked)
    scorer = _Scorer(geometry, truths, stored, attacked, per_image_keys)
    report = AuditReport(geometry, codec, len(attacked), len(prior_images), per_image_keys)
    reconstructions = {}
    for m in plan.pairs:
        if m < len(attacked):
            others = stored[m:m + KP_UPLOADS]
            estimate, seconds = _timed(known_plaintext_attack, attacked[:m], stored[:m], geometry, codec, others)
            report.rows.append(scorer.row("known plaintext", m, estimate, slice(m, None), seconds))
            reconstructions.setdefault("known plaintext", (estimate, f"{m} known pair" + "s" * (m > 1)))
    for n in sorted({min(c, len(attacked)) for c in plan.counts}):
        estimate, seconds = _timed(ciphertext_only_attack, stored[:n], geometry, prior)
        report.rows.append(scorer.row("ciphertext only", n, estimate, slice(0, n), seconds))
        reconstructions["ciphertext only"] = (estimate, f"{n} uploads only")
    if plan.per_image:
        estimates, seconds = _timed(per_image_attack, stored[:plan.per_image], geometry, prior)
        report.rows.append(scorer.row("one image at a time", 1, estimates, slice(0, plan.per_image),
                                      seconds / max(1, len(estimates))))
    if picture is not None:
        write_picture(picture, attacked, stored, reconstructions, geometry)
        report.picture = picture
    return report


@dataclass
class _Scorer:
    """Scores an estimate on a range of the attacked images against the truth the owner alone knows."""

    geometry: CipherGeometry
    truths: list  # the true schedule of every attacked image (all the same under the owner's key)
    stored: np.ndarray
    plain: np.ndarray
    per_image_keys: bool

    def row(self, attack: str, held: int, estimate, images: slice, seconds: float) -> AttackRow:
        """``estimate``: one schedule for every image, or a list of one per image (one image at a time)."""
        stored, plain, truths = self.stored[images], self.plain[images], self.truths[images]
        each = estimate if isinstance(estimate, list) else [estimate] * len(stored)
        if self.per_image_keys or isinstance(estimate, list):
            score = score_each(each, truths, self.geometry, stored, plain)
        else:  # one key: the mirror reading is decided once for the whole key
            score = score_attack(estimate, truths[0], self.geometry, stored, plain)
        if self.geometry.scheme != "gray":
            return AttackRow(attack, held, len(plain), score, seconds, verdict_of(score))
        layout, y_ssim = luma_figures(each, list(truths), self.geometry, stored, plain)
        if layout is not None:
            score = dataclasses.replace(score, arrangement=layout)
        return AttackRow(attack, held, len(plain), score, seconds, verdict_seen(score, y_ssim), y_ssim)


def write_picture(path: Path, plain: np.ndarray, stored: np.ndarray, reconstructions: dict,
                  geometry: CipherGeometry, count: int = 6) -> None:
    """One PNG, a row per image: plain | encrypted as uploaded | what each attack reconstructs."""
    rows = []
    for i in range(count, min(2 * count, len(plain))):  # past the known-plaintext pairs
        shown = stored[i] if stored[i].ndim == 3 else np.repeat(stored[i][:, :, None], 3, axis=2)
        tiles = [plain[i], shown]
        for estimate, _ in reconstructions.values():
            tiles.append(ScheduleCipher(estimate, geometry).decrypt(stored[i:i + 1])[0])
        gap = np.full((plain.shape[1], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([t for tile in tiles for t in (tile, gap)], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    img = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, 96 // geometry.height)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    labels = ["plain", "uploaded"] + [held for _, held in reconstructions.values()]
    _with_header(img, labels, (geometry.width + 2) * scale).save(path)


PICTURE_HEADER = 14  # pixels of column labels above the picture


def _with_header(img: Image.Image, labels: list[str], column: int) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + PICTURE_HEADER), "white")
    out.paste(img, (0, PICTURE_HEADER))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(labels):
        draw.text((i * column + 2, 1), label, fill="black")
    return out


def table_text(report: AuditReport) -> str:
    """The human-readable table printed by ``owner-agent audit``."""
    g = report.geometry
    keys = "each image under its own fresh key" if report.per_image_keys else "one key"
    gray = g.scheme == "gray"
    lines = [f"audit of {g.height}x{g.width} {g.scheme} EtC, {g.block}-pixel blocks, {report.codec.format} "
             f"(q{report.codec.quality}), {keys}: {report.attacked} images attacked, {report.prior_images} held out "
             "as the attacker's prior",
             f"{'attack':<22}{'images':>7}{'key':>7}{'pos':>7}{'arr~':>7}{'orient':>7}{'neg':>7}{'chan':>7}"
             f"{'exact':>7}{'exact~':>7}{'SSIM':>7}" + (f"{'SSIM-Y':>7}" if gray else "")
             + f"{'PSNR':>7}{'s':>8}  verdict"]
    for r in report.rows:
        s = r.score
        ch = f"{s.channels:7.0%}" if s.channels is not None else f"{'-':>7}"
        arr = f"{s.arrangement:7.0%}" if s.arrangement is not None else f"{'-':>7}"
        luma = (f"{r.luma_ssim:7.2f}" if r.luma_ssim is not None else f"{'-':>7}") if gray else ""
        lines.append(f"{r.attack:<22}{r.images:>7}{s.key:7.0%}{s.position:7.0%}{arr}{s.orientation:7.0%}"
                     f"{s.negate:7.0%}{ch}{s.exact:7.0%}{s.exact_up_to_flip:7.0%}{s.ssim:7.2f}{luma}{s.psnr:7.1f}"
                     f"{r.seconds:8.2f}  {r.verdict}")
    lines.append("key: blocks with every part of the schedule right (up to one mirror flip); arr~: blocks in place up "
                 "to a turn of the whole image; exact: images decrypted as the key does (exact~: or as their mirror "
                 "image); SSIM/PSNR: reconstruction vs plain" + ("; gray: arr~ and SSIM-Y are the Y plane's alone, and "
                                                                  "the verdict takes the better SSIM" if gray else ""))
    lines.append(f"verdict (what a cloud can do with the uploads alone): {report.verdict}. Thresholds: broken "
                 f"if key >= {BROKEN['key']:.0%} or exact~ >= {BROKEN['exact']:.0%} or SSIM >= {BROKEN['ssim']}; "
                 f"weak if key >= {WEAK['key']:.0%} or exact~ >= {WEAK['exact']:.0%} or SSIM >= {WEAK['ssim']} "
                 f"or arr~ >= {WEAK['layout']:.0%}")
    return "\n".join(lines)
