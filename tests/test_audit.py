"""owner-agent audit: the attacks run on the owner's own images and key, a table, a verdict, a picture."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.cli import main as orchestrator_main
from orchestrator.config import privacy_warning
from owners.attacks.scoring import Score
from owners.audit import PICTURE_HEADER, AuditError, AuditPlan, run_audit, verdict_of
from owners.cipher import CipherGeometry, privacy_verdict
from owners.cli import main
from protocol.codec import Codec
from protocol.privacy import MEASURED_BREAKS, blocks_and_ways
from protocol.task import Task

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample"


def score(key=0.0, exact=0.0, ssim=0.0, layout=None) -> Score:
    return Score(key, key, key, key, key, exact, exact, ssim, 10.0, False, layout)


@pytest.mark.parametrize("values,verdict", [
    ({}, "holds"), ({"key": 0.09, "exact": 0.04, "ssim": 0.29}, "holds"),
    ({"key": 0.1}, "weak"), ({"exact": 0.05}, "weak"), ({"ssim": 0.3}, "weak"),
    ({"key": 0.5}, "broken"), ({"exact": 0.5}, "broken"), ({"ssim": 0.6}, "broken"),
    ({"layout": 0.49}, "holds"), ({"layout": 0.5}, "weak"), ({"layout": 1.0, "ssim": 0.6}, "broken"),
])
def test_verdict_thresholds_are_the_documented_ones(values, verdict):
    assert verdict_of(score(**values)) == verdict


def test_audit_breaks_the_default_geometry_and_draws_the_picture(tmp_path):
    picture = tmp_path / "audit.png"
    report = run_audit(SAMPLE / "train", bytes(range(32)), CipherGeometry(32, 32, 16, "color"), Codec(),
                       AuditPlan(counts=(150,), pairs=(1,), per_image=3, limit=200), picture)
    rows = {r.attack: r for r in report.rows}
    assert report.attacked == 160 and report.prior_images == 40
    assert rows["known plaintext"].score.key == 1.0 and rows["known plaintext"].verdict == "broken"
    assert rows["ciphertext only"].images == 150 and rows["ciphertext only"].verdict == "broken"
    assert "one image at a time" in rows and report.verdict == "broken"
    with Image.open(picture) as img:  # 6 rows: plain | uploaded | known plaintext | ciphertext only
        assert img.size == (4 * 34 * 3, 6 * 34 * 3 + PICTURE_HEADER)  # 32-pixel tiles, 2-pixel gaps, 3x; labels


def test_cli_audit_prints_json_and_never_creates_a_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    assert main(["audit", "--key", "nokey", "--data", str(SAMPLE / "test")]) == 1
    assert "nokey" in capsys.readouterr().err
    assert main(["keygen", "mine"]) == 0
    capsys.readouterr()
    out = tmp_path / "a.png"
    assert main(["audit", "--key", "mine", "--data", str(SAMPLE / "test"), "--out", str(out), "--json",
                 "--images", "100", "--pairs", "1", "--per-image", "2", "--limit", "150",
                 "--prior", str(SAMPLE / "train")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["geometry"] == {"size": 32, "block": 16, "scheme": "color"}
    assert doc["verdict"] == "broken" and out.exists()
    assert [a["attack"] for a in doc["attacks"]] == ["known plaintext", "ciphertext only", "one image at a time"]


def test_too_few_images_is_a_clear_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(AuditError, match="readable images"):
        run_audit(tmp_path, bytes(32), CipherGeometry(32, 32, 16, "color"), Codec())


@pytest.mark.parametrize("spec", sorted(MEASURED_BREAKS))
def test_every_measured_geometry_is_broken_by_the_audits_own_thresholds(spec):
    scheme, size, block = spec
    images, key, exact, ssim = MEASURED_BREAKS[spec]
    assert verdict_of(score(key=key, exact=exact, ssim=ssim)) == "broken"
    verdict, text = privacy_verdict(CipherGeometry(size, size, block, scheme))
    assert verdict == "broken" and f"from {images} encrypted images" in text and f"{key:.0%} of the key" in text


def test_an_unmeasured_geometry_is_assumed_broken():
    verdict, text = privacy_verdict(CipherGeometry(48, 48, 16, "color"))
    assert verdict == "broken" and "not measured" in text


def test_encrypt_shows_the_verdict_and_refuses_what_one_image_breaks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    for name in sorted((SAMPLE / "test" / "cat").iterdir())[:3]:
        (data / name.name).write_bytes(name.read_bytes())
    base = ["encrypt", "--key", "k", "--data", str(tmp_path / "data"), "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "o1"), "--accept-cloud-can-decrypt"]) == 0
    err = capsys.readouterr().err
    assert "PRIVACY VERDICT: broken. 32x32 color EtC in 16-pixel blocks: from 30 encrypted images" in err
    assert err.index("PRIVACY VERDICT") < err.index("outbox ready")
    assert main([*base, "--out", str(tmp_path / "o2"), "--block", "32"]) == 1
    assert "Refused: nothing was written or sent. Pass --accept-cloud-can-decrypt" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert main([*base, "--out", str(tmp_path / "o3"), "--block", "32", "--allow-weak-geometry"]) == 0  # deprecated
    err = capsys.readouterr().err
    assert "1 block(s): 96 ways to encrypt an image" in err and "--allow-weak-geometry is deprecated" in err


@pytest.mark.parametrize("size,block,scheme", [*[(s, b, sc) for sc, s, b in sorted(MEASURED_BREAKS)], (48, 16, "color"),
                                               (32, 32, "color"), (16, 8, "gray"), (128, 16, "color")])
def test_orchestrator_check_warns_the_operator_in_the_owners_words(size, block, scheme):
    task = Task(("a", "b"), size, block, scheme)
    geometry = CipherGeometry(size, size, block, scheme)
    assert privacy_warning(task) == privacy_verdict(geometry)[1]
    blocks, ways = blocks_and_ways(scheme, size, size, block)  # the shared text counts as the cipher does
    assert blocks == geometry.num_blocks and math.log2(ways) == pytest.approx(geometry.key_space_bits)
    assert privacy_warning(Task(("a", "b"), size, block, "plain")) is None


def test_orchestrator_check_prints_the_verdict(capsys):
    config = Path(__file__).resolve().parents[1] / "deploy" / "local-cpu.yaml"
    assert orchestrator_main(["check", str(config)]) == 0
    assert "PRIVACY VERDICT: broken. 32x32 color EtC in 16-pixel blocks" in capsys.readouterr().err


def test_per_image_keys_audit_scores_each_image_against_its_own_key(tmp_path):
    """Under per-image keys the pooled attack and one leaked pair recover (almost) nothing of the other
    images' keys, where under one key they recover all of it (the test above)."""
    report = run_audit(SAMPLE / "train", bytes(range(32)), CipherGeometry(32, 32, 8, "color"), Codec(),
                       AuditPlan(counts=(150,), pairs=(1,), per_image=2, limit=200), tmp_path / "a.png",
                       per_image_keys=True)
    rows = {r.attack: r for r in report.rows}
    assert report.per_image_keys and report.as_dict()["key_mode"] == "per-image"
    assert rows["known plaintext"].score.key < 0.1 and rows["known plaintext"].score.exact_up_to_flip == 0.0
    assert rows["ciphertext only"].score.key < 0.1 and rows["ciphertext only"].score.ssim < 0.3
    assert rows["one image at a time"].scored == 2
