"""The gray scheme attacked one image at a time (owners/attacks/gray.py, few_images_attack): the luma
plane as a jigsaw of blocks in 8 orientations x 2 polarities, the chroma planes placed after it.

Small and fast: a synthetic smooth picture (where the answer is known to be reachable), a few
sample images through the product's cipher, and the verdict the measured row gives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.frontier import ATTACKS, CellSpec, FrontierConfig, attack_columns
from owners.attacks.ciphertext_only import ciphertext_only_attack
from owners.attacks.common import make_schedule, mirrored
from owners.attacks.luma import luma_arrangement, luma_figures, luma_ssim
from owners.attacks.per_image import per_image_attack
from owners.attacks.per_image_keys import encrypt_each
from owners.attacks.prior import NaturalImagePrior
from owners.attacks.scoring import Score
from owners.audit import AuditPlan, run_audit, table_text, verdict_seen
from owners.cipher import (
    BlockCipher,
    CipherGeometry,
    CloudCanDecrypt,
    derive_schedule,
    encrypt_reference,
    privacy_gate,
    rgb_to_stacked_ycbcr,
)
from owners.images import load_rgb, scan_image_folder
from protocol.codec import Codec
from protocol.privacy import MEASURED_ONE_IMAGE, privacy_verdict, verdict_of_figures
from tests.test_frontier import _images

GRAY = CipherGeometry(32, 32, 8, "gray")
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample"
YY, XX = np.mgrid[0:32, 0:32].astype(float)


def smooth_picture(phase: float) -> np.ndarray:
    """A nearly grey picture (flat chroma) whose brightness varies smoothly and never repeats a block."""
    y = 128 + 55 * np.sin(XX / 5.0 + YY / 9.0 + phase) + 35 * np.cos(YY / 4.0 - XX / 13.0) + 2.0 * YY - 30
    return np.clip(np.stack([y + 6, y, y - 6], axis=-1), 0, 255).astype(np.uint8)


def sample(count: int) -> np.ndarray:
    items = scan_image_folder(SAMPLE / "train").images
    return np.stack([load_rgb(item.path, 32)[0] for item in items[:: max(1, len(items) // count)][:count]])


@pytest.mark.parametrize("seed", [0, 1])
def test_the_luma_jigsaw_puts_a_smooth_picture_back_together(seed):
    """Only the luma blocks moved, turned and negated: the attack must find the luma blocks among the
    48, solve their puzzle and choose the whole plane's turn and polarity (chance: about 15% of the
    layout up to a turn, SSIM near 0)."""
    rng = np.random.default_rng(seed)
    n = GRAY.num_blocks
    luma = np.flatnonzero(np.arange(n) % 12 < 4)  # the first 4 of each row's 12 blocks are the Y plane's
    source, transform, negate = np.arange(n), np.zeros(n, np.int64), np.zeros(n, bool)
    source[luma] = rng.permutation(luma)
    transform[luma] = rng.integers(0, 8, len(luma))
    negate[luma] = rng.integers(0, 2, len(luma)).astype(bool)
    truth = make_schedule(source, transform, negate, None)
    plain = smooth_picture(0.0)[None]
    encrypted = encrypt_reference(rgb_to_stacked_ycbcr(plain)[0][..., None], truth, GRAY.block)[None, ..., 0]
    prior = NaturalImagePrior.from_images(np.stack([smooth_picture(p) for p in np.linspace(-0.3, 0.3, 5)]))
    estimate = per_image_attack(encrypted, GRAY, prior)[0]
    assert luma_arrangement(estimate, truth, GRAY) >= 0.75
    assert luma_ssim(estimate, GRAY, encrypted, plain)[0] >= 0.6


def test_per_image_attack_dispatches_the_gray_scheme_and_gives_a_schedule_per_image():
    images = sample(3)
    prior = NaturalImagePrior.from_images(sample(40))
    stored, truths = encrypt_each(images, GRAY, Codec())
    estimates = per_image_attack(stored, GRAY, prior)
    assert len(estimates) == 3
    for estimate in estimates:
        assert sorted(estimate.source) == list(range(GRAY.num_blocks))  # every block somewhere, once
        planes = np.bincount(estimate.source % 12 // 4, minlength=3)
        assert planes.tolist() == [16, 16, 16]  # a third of the blocks to each of Y, Cb, Cr
        assert estimate.channel_order is None
    # the pooled attack falls back to it below MIN_IMAGES instead of refusing (N = 1 under a per-image key)
    alone = ciphertext_only_attack(stored[:1], GRAY, prior)
    assert np.array_equal(alone.source, estimates[0].source)


def test_luma_scores_read_the_truth_as_right_and_a_stranger_as_wrong():
    truth = derive_schedule(bytes(32), GRAY)
    assert luma_arrangement(truth, truth, GRAY) == 1.0
    assert luma_arrangement(mirrored(truth, GRAY), truth, GRAY) == 1.0  # up to a flip of the whole image
    assert luma_arrangement(derive_schedule(bytes(range(32)), GRAY), truth, GRAY) < 0.4
    assert luma_arrangement(truth, truth, CipherGeometry(32, 64, 8, "gray")) is None  # planes not square


def test_luma_ssim_credits_the_grey_picture_turned_mirrored_or_negated_and_not_a_stranger():
    """What a viewer undoes by eye counts: the true Y plane turned a quarter, mirrored, or negated
    scores as the plane itself; a random key's reading stays far below."""
    images = sample(4)
    stored, truths = encrypt_each(images, GRAY, Codec())
    own = luma_ssim(truths[0], GRAY, stored[:1], images[:1])[0]
    assert own > 0.9
    for change in (lambda y: np.rot90(y, 1, axes=(1, 2)), lambda y: y[:, :, ::-1], lambda y: 255 - y):
        truth_y = rgb_to_stacked_ycbcr(images[:1])[..., :32]  # the plain Y plane, changed as a whole ...
        changed = np.repeat(change(truth_y)[..., None], 3, axis=-1).astype(np.uint8)  # ... read as a grey picture
        assert luma_ssim(truths[0], GRAY, stored[:1], changed)[0] > 0.9 * own
    strangers = [BlockCipher(bytes([i]) * 32, GRAY).schedule for i in range(4)]
    layout, stranger = luma_figures(strangers, truths, GRAY, stored, images)
    assert stranger < 0.5 and layout < 0.5
    # one estimate for every image is scored in one batch, with the same figures as image by image
    batch = luma_figures([truths[0]] * 4, [truths[0]] * 4, GRAY, stored[:1].repeat(4, 0), images[:1].repeat(4, 0))
    assert batch[0] == 1.0 and abs(batch[1] - own) < 1e-9


def test_the_gray_verdict_takes_the_better_of_the_colour_and_the_grey_picture():
    low = Score(key=0.0, position=0.0, orientation=0.0, negate=0.5, exact=0.0, exact_up_to_flip=0.0, ssim=0.05,
                psnr=10.0, channels=None, mirrored=False, arrangement=0.2)
    assert verdict_seen(low) == "holds" and verdict_seen(low, 0.1) == "holds"
    assert verdict_seen(low, 0.36) == "weak" and verdict_seen(low, 0.7) == "broken"


def test_the_per_image_key_verdict_on_gray_follows_the_measured_row():
    n, key, layout, exact, ssim = MEASURED_ONE_IMAGE[("gray", 32, 8)]
    verdict, text = privacy_verdict("gray", 32, 32, 8, "per-image")
    assert verdict == verdict_of_figures(key, exact, ssim, layout)
    assert "not measured" not in text and f"attacking {n} images one at a time" in text
    shown = []
    if verdict == "broken":  # the product refuses what the measurement breaks
        with pytest.raises(CloudCanDecrypt):
            privacy_gate(GRAY, "per-image", False, shown.append)
    else:  # and lets through what it does not, saying so
        assert privacy_gate(GRAY, "per-image", False, shown.append) == verdict
        assert shown and f"PRIVACY VERDICT: {verdict}." in shown[0]
    assert privacy_verdict("gray", 64, 64, 8, "per-image")[0] == "broken"  # still not measured there


def test_the_frontier_fills_every_attack_column_of_a_gray_per_image_key_row(tmp_path):
    train = _images(tmp_path / "train", 6, seed=1)
    _images(tmp_path / "prior", 6, seed=2)
    cfg = FrontierConfig(data=tmp_path / "train", one_at_a_time=2, out=tmp_path / "out")
    attacks = attack_columns(CellSpec("gray32-b8", owners=1, strategy="per-image-keys"), [train],
                             tmp_path / "prior", cfg, tmp_path / "work")
    assert set(attacks) == set(ATTACKS)
    for attack in ATTACKS:
        assert "note" not in attacks[attack] and 0 <= attacks[attack]["key"] <= 1, attacks[attack]
    assert attacks["ciphertext only"]["images"] == 1 and attacks["one image at a time"]["scored"] == 2
    assert all(-1 <= attacks[a]["luma_ssim"] <= 1 and attacks[a]["arrangement"] is not None for a in ATTACKS)


def test_the_audit_attacks_gray_one_image_at_a_time_and_scores_its_luma_plane():
    report = run_audit(SAMPLE / "train", bytes(range(32)), GRAY, Codec(),
                       AuditPlan(counts=(10,), pairs=(1,), per_image=2, limit=40), per_image_keys=True)
    rows = {r.attack: r for r in report.rows}
    one = rows["one image at a time"]
    assert one.scored == 2 and one.luma_ssim is not None and 0 <= one.score.arrangement <= 1
    assert one.as_dict()["luma_ssim"] == round(one.luma_ssim, 4)
    assert "SSIM-Y" in table_text(report)
