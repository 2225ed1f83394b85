"""The privacy verdict on a cipher geometry, in the words both sides show: the owner before it sends
anything (``owners/cipher.py``), the operator in ``orchestrator check``. One text, one table.

MEASURED_BREAKS: what the product's own ciphertext-only attack (``owners/attacks``, ``owner-agent
audit``) did to one owner's uploads under one key, measured by ``benchmarks/privacy_audit.py``
(``docs/privacy.md``): (scheme, size, block) -> (encrypted images the cloud held, fraction of the
key recovered, fraction of those images reconstructed exactly up to a mirror flip, SSIM of the
reconstructions), at the fewest images measured, all ``broken``. A geometry not listed is not
measured: an attack that is not measured is assumed to succeed.
"""
from __future__ import annotations

import math

MEASURED_BREAKS = {
    ("color", 32, 16): (30, 1.00, 1.00, 0.99),
    ("color", 32, 8): (30, 1.00, 1.00, 0.95),
    ("gray", 32, 8): (30, 0.88, 0.00, 0.96),
    ("color", 64, 16): (30, 1.00, 1.00, 0.96),
    ("gray", 64, 8): (30, 0.54, 0.00, 0.82),
    ("color", 224, 16): (100, 1.00, 1.00, 0.93),
    ("gray", 224, 8): (100, 0.49, 0.00, 0.93),
}
PRIVACY_DOC = "docs/privacy.md"
MIN_BLOCKS = 4  # fewer blocks: every encryption of one image can simply be tried


def blocks_and_ways(scheme: str, height: int, width: int, block: int) -> tuple[int, int]:
    """Blocks per image and the number of block schedules: n! * (8 orientations x 2 negations x 6
    channel orders (colour only))^n. Gray EtC works on the Y, Cb, Cr planes side by side (3x wide)."""
    n = (height // block) * (width * (1 if scheme == "color" else 3) // block)
    return n, math.factorial(n) * (8 * 2 * (6 if scheme == "color" else 1)) ** n


def verdict_text(scheme: str, height: int, width: int, block: int) -> str:
    """``PRIVACY VERDICT: broken. <why, with the measured numbers> ...``: every geometry is broken by a
    measured attack, by trying every encryption (fewer than MIN_BLOCKS blocks), or by assumption."""
    name = f"{height}x{width} {scheme} EtC in {block}-pixel blocks"
    blocks, ways = blocks_and_ways(scheme, height, width, block)
    measured = MEASURED_BREAKS.get((scheme, height, block)) if height == width else None
    if blocks < MIN_BLOCKS:
        why = f"{name} makes {blocks} block(s): {ways} ways to encrypt an image, each of which can simply be tried, " \
              "one image at a time"
    elif measured:
        n, key, exact, ssim = measured
        why = (f"{name}: from {n} encrypted images of one key, the ciphertext-only attack of `owner-agent audit` "
               f"recovered {key:.0%} of the key; its reconstructions reach SSIM {ssim:.2f}, {exact:.0%} of them "
               "exact up to a mirror flip")
    else:
        why = f"{name} is not measured, and an attack that is not measured is assumed to succeed"
    return (f"PRIVACY VERDICT: broken. {why} ({PRIVACY_DOC}). This encryption hides images from a person "
            "glancing at the uploads, not from a cloud that runs the published attacks; run `owner-agent "
            "audit` on your own images, or keep them here with `owner-agent federate`")
