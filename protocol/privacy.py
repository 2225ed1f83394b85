"""The privacy verdict on a cipher geometry and key mode, in the words both sides show: the owner before
it writes or sends anything (``owners/cipher.py``), the operator in ``orchestrator check``. One text,
two measured tables, one set of thresholds.

BROKEN / WEAK are ``owner-agent audit``'s thresholds (``owners/audit.py`` imports them from here:
protocol is the one package both sides may import, so the audit and this verdict cannot drift apart).

MEASURED_BREAKS (key_mode "owner", one key for all of an owner's images): what the product's own
ciphertext-only attack (``owners/attacks``, ``owner-agent audit``) did to one owner's uploads under
one key, measured by ``benchmarks/privacy_audit.py`` (``docs/privacy.md``): (scheme, size, block) ->
(encrypted images the cloud held, fraction of the key recovered, fraction of those images
reconstructed exactly up to a mirror flip, SSIM of the reconstructions), at the fewest images measured.

MEASURED_ONE_IMAGE (key_mode "per-image", a fresh key for every image): every attack run on uploads
that are each under their own random key (``owners/attacks/per_image_keys.py``), measured by
``python -m benchmarks.privacy_audit --per-image-keys ...`` (``docs/privacy.md``, "Per-image keys"):
the pooled ciphertext-only attack and a leaked pair recover nothing beyond chance there, so the row
is the one-image-at-a-time attack's (``owners/attacks/per_image.py``), the strongest of the three:
(scheme, size, block) -> (images attacked one at a time, fraction of the key, fraction of blocks in
place up to a turn of the whole image, fraction of images exact up to a mirror flip, SSIM). Colour
224x224 is the same attack on images under one owner key (not re-measured with per-image keys; one
image at a time cannot tell the difference). Gray 32x32 is the gray scheme's one-image attack
(``owners/attacks/gray.py``, ``few_images_attack``): its layout is the Y plane's (the three planes
side by side make no square grid) and its SSIM the better of the RGB picture's and the Y plane's
alone at its best reading, any turn, flip or negation of the whole picture (``owners/attacks/luma.py``;
here the Y plane's, 0.37 against 0.14 RGB and about 0.18 for a random key): a grey picture recovered
with wrong colours, upside down or negated, is a privacy loss, so the verdict takes what the cloud sees
best. Gray 64x64 and 224x224 are not measured one image at a time.

A geometry or key mode not in its table is not measured: an attack that is not measured is assumed
to succeed (``broken``).
"""
from __future__ import annotations

import math

BROKEN = {"key": 0.5, "exact": 0.5, "ssim": 0.6}
WEAK = {"key": 0.1, "exact": 0.05, "ssim": 0.3, "layout": 0.5}
VERDICTS = ("holds", "weak", "broken")  # in order of what the cloud learns

MEASURED_BREAKS = {
    ("color", 32, 16): (30, 1.00, 1.00, 0.99),
    ("color", 32, 8): (30, 1.00, 1.00, 0.95),
    ("gray", 32, 8): (30, 0.88, 0.00, 0.96),
    ("color", 64, 16): (30, 1.00, 1.00, 0.96),
    ("gray", 64, 8): (30, 0.54, 0.00, 0.82),
    ("color", 224, 16): (100, 1.00, 1.00, 0.93),
    ("gray", 224, 8): (100, 0.49, 0.00, 0.93),
}
MEASURED_ONE_IMAGE = {
    ("color", 32, 16): (20, 0.05, 0.91, 0.05, 0.12),
    ("color", 32, 8): (20, 0.00, 0.18, 0.00, 0.05),
    ("color", 64, 16): (20, 0.01, 0.35, 0.00, 0.13),
    ("color", 224, 16): (5, 0.00, 0.02, 0.00, 0.38),
    ("gray", 32, 8): (100, 0.03, 0.36, 0.00, 0.37),
}
PRIVACY_DOC = "docs/privacy.md"
MIN_BLOCKS = 4  # fewer blocks: every encryption of one image can simply be tried

_TAIL = {
    "broken": "This encryption hides images from a person glancing at the uploads, not from a cloud that runs the "
              "published attacks; run `owner-agent audit` on your own images, or keep them here with "
              "`owner-agent federate`",
    "weak": "A cloud running these attacks learns part of each image (above), more than a glance does; keep them "
            "here with `owner-agent federate` if that is too much",
    "holds": "No attack measured here recovers these images from the uploads alone; a better attack may",
}


def verdict_of_figures(key: float, exact: float, ssim: float, layout: float | None = None) -> str:
    """``holds``, ``weak`` or ``broken`` for an attack's figures (fractions; ``layout`` None where the
    block grid is not square), by the thresholds above."""
    values = {"key": key, "exact": exact, "ssim": ssim, "layout": -1.0 if layout is None else layout}
    for name, bar in (("broken", BROKEN), ("weak", WEAK)):
        if any(values[k] >= bar[k] for k in bar):
            return name
    return "holds"


def blocks_and_ways(scheme: str, height: int, width: int, block: int) -> tuple[int, int]:
    """Blocks per image and the number of block schedules: n! * (8 orientations x 2 negations x 6
    channel orders (colour only))^n. Gray EtC works on the Y, Cb, Cr planes side by side (3x wide)."""
    n = (height // block) * (width * (1 if scheme == "color" else 3) // block)
    return n, math.factorial(n) * (8 * 2 * (6 if scheme == "color" else 1)) ** n


def _one_key(name: str, height: int, width: int, scheme: str, block: int) -> tuple[str, str]:
    measured = MEASURED_BREAKS.get((scheme, height, block)) if height == width else None
    if not measured:
        return "broken", f"{name} is not measured, and an attack that is not measured is assumed to succeed"
    n, key, exact, ssim = measured
    return verdict_of_figures(key, exact, ssim), (
        f"{name}: from {n} encrypted images of one key, the ciphertext-only attack of `owner-agent audit` "
        f"recovered {key:.0%} of the key; its reconstructions reach SSIM {ssim:.2f}, {exact:.0%} of them exact up "
        "to a mirror flip")


def _per_image(name: str, height: int, width: int, scheme: str, block: int) -> tuple[str, str]:
    measured = MEASURED_ONE_IMAGE.get((scheme, height, block)) if height == width else None
    name = f"{name} with a fresh key per image"
    if not measured:
        return "broken", f"{name} is not measured one image at a time, and an attack that is not measured is " \
                         "assumed to succeed"
    n, key, layout, exact, ssim = measured
    gray = scheme == "gray"  # its layout is the Y plane's (three planes side by side make no square grid)
    blocks = "the luma plane's blocks" if gray else "the blocks"
    seen = " (the better of the RGB picture's and its luma plane's)" if gray else ""
    return verdict_of_figures(key, exact, ssim, layout), (
        f"{name}: attacking {n} images one at a time, the attack of `owner-agent audit` put {layout:.0%} of "
        f"{blocks} in place up to a turn of the whole image and recovered {key:.0%} of the key; {exact:.0%} of the "
        f"images exact up to a mirror flip, SSIM {ssim:.2f}{seen}")


def privacy_verdict(scheme: str, height: int, width: int, block: int, key_mode: str = "owner") -> tuple[str, str]:
    """(verdict, ``PRIVACY VERDICT: <verdict>. <why, with the measured numbers> ...``) for a cipher
    geometry under ``key_mode`` ("owner": one key per owner; "per-image": a fresh key per image)."""
    name = f"{height}x{width} {scheme} EtC in {block}-pixel blocks"
    blocks, ways = blocks_and_ways(scheme, height, width, block)
    if blocks < MIN_BLOCKS:
        verdict, why = "broken", f"{name} makes {blocks} block(s): {ways} ways to encrypt an image, each of which " \
                                 "can simply be tried, one image at a time"
    elif key_mode == "per-image":
        verdict, why = _per_image(name, height, width, scheme, block)
    else:
        verdict, why = _one_key(name, height, width, scheme, block)
    return verdict, f"PRIVACY VERDICT: {verdict}. {why} ({PRIVACY_DOC}). {_TAIL[verdict]}"
