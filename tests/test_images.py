"""Image loading at the owner: awkward files, folder scanning, resize/crop, and `owner-agent encrypt`
end to end on a folder full of bad files. All inputs are generated in tmp_path (tests/badfiles.py)."""
from __future__ import annotations

import io
import json
import re
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owners import images
from owners.cli import main
from owners.images import BadImage, DataFolderError, load_rgb, scan_image_folder
from tests.badfiles import (
    CLASS_A,
    CLASS_B,
    SCAN_SKIPPED,
    SPEC,
    bomb_png,
    halves,
    make_bad_folder,
    structured_rgb,
)

SIZE = 32
LOADED = sorted(rel for rel in SPEC if rel not in SCAN_SKIPPED)  # files that reach load_rgb
USABLE = sorted(rel for rel, (outcome, _) in SPEC.items() if outcome != "skipped")
REFUSED = sorted(rel for rel, (outcome, _) in SPEC.items() if outcome == "skipped")

@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad") / "data"
    return root, make_bad_folder(root)


def _png(tmp_path: Path, img: Image.Image, name: str) -> Path:
    path = tmp_path / name
    img.save(path, "PNG")
    return path


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- 1. load_rgb on every awkward file --------------------------------------------------------------

def test_fixture_outcomes_cover_the_brief(bad_folder):
    root, expected = bad_folder
    assert expected == {rel: outcome for rel, (outcome, _) in SPEC.items()}
    assert set(expected.values()) == {"ok", "converted", "skipped"}
    assert all((root / rel).is_file() for rel in expected)
    assert (root / f"{CLASS_A}/zqx_zero_bytes.jpg").stat().st_size == 0
    with Image.open(root / f"{CLASS_B}/zqx_sixteen_bit.png") as img:
        assert img.mode.startswith("I")  # really a 16-bit file
    with Image.open(root / f"{CLASS_B}/zqx_cmyk.jpg") as img:
        assert img.mode == "CMYK"
    with Image.open(root / f"{CLASS_B}/zqx_palette_transparent.png") as img:
        assert img.mode == "P" and "transparency" in img.info


@pytest.mark.parametrize("rel", LOADED)
def test_load_rgb_outcome(bad_folder, rel):
    root, expected = bad_folder
    outcome, keyword = SPEC[rel]
    if outcome == "skipped":
        with pytest.raises(BadImage) as info:
            load_rgb(root / rel, SIZE)
        reason = str(info.value)
        assert keyword in reason, reason
        assert len(reason) > len(keyword)  # a sentence, not just a code
        return
    arr, notes = load_rgb(root / rel, SIZE)
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8
    assert arr.std() > 5  # real content, not a blank frame
    if outcome == "converted":
        assert any(keyword in note for note in notes), notes
    else:
        # "ok": no conversion worth reporting
        assert [n for n in notes if "EXIF" not in n] == [], notes


def test_no_exif_note_without_orientation_tag(bad_folder):
    root, _ = bad_folder
    wrong = {}
    for rel in LOADED:
        outcome, keyword = SPEC[rel]
        if outcome == "skipped":
            continue
        _, notes = load_rgb(root / rel, SIZE)
        if outcome == "ok" and notes or keyword != "EXIF orientation" and any("EXIF" in n for n in notes):
            wrong[rel] = notes
    assert wrong == {}


def test_reasons_are_informative(bad_folder):
    root, _ = bad_folder
    reasons = {}
    for rel in REFUSED:
        if rel in SCAN_SKIPPED:
            continue
        with pytest.raises(BadImage) as info:
            load_rgb(root / rel, SIZE)
        reasons[Path(rel).name] = str(info.value)
    assert reasons["zqx_zero_bytes.jpg"].startswith("empty")
    assert "decompression bomb" in reasons["zqx_bomb_huge.png"]
    assert "900000000" in reasons["zqx_bomb_huge.png"]  # the claimed size is shown
    assert "decompression bomb" in reasons["zqx_bomb_warn.png"]
    assert "identify" in reasons["zqx_text_renamed.png"]
    assert "decode" in reasons["zqx_truncated.jpg"] and "truncated" in reasons["zqx_truncated.jpg"]
    assert "PPM" in reasons["zqx_portable_pixmap.png"]
    assert len(set(reasons.values())) == len(reasons)


def test_sixteen_bit_uses_full_8bit_range(bad_folder):
    root, _ = bad_folder
    path = root / f"{CLASS_B}/zqx_sixteen_bit.png"
    arr, _ = load_rgb(path, SIZE)
    assert arr.min() <= 8 and arr.max() >= 247, (arr.min(), arr.max())
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])  # grey
    row = arr[SIZE // 2, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[-1] - row[0] > 230  # the ramp survives, left to right
    assert np.abs(arr[:, :, 0].astype(int) - row).max() <= 1  # same in every row


def test_palette_transparency_composited_on_white(bad_folder):
    root, _ = bad_folder
    arr, notes = load_rgb(root / f"{CLASS_B}/zqx_palette_transparent.png", SIZE)
    left, right = arr[:, : SIZE // 2 - 2], arr[:, SIZE // 2 + 2 :]
    assert left.min() >= 250  # transparent -> white (its palette colour is black)
    assert np.abs(right.astype(int) - (20, 40, 230)).max() <= 3


def test_opaque_rgba_matches_rgb(bad_folder, tmp_path):
    root, _ = bad_folder
    arr, _ = load_rgb(root / f"{CLASS_A}/zqx_opaque_rgba.png", SIZE)
    ref, _ = load_rgb(_png(tmp_path, structured_rgb(64, 64, seed=4), "ref.png"), SIZE)
    assert np.array_equal(arr, ref)


def test_cmyk_colours_survive(bad_folder, tmp_path):
    root, _ = bad_folder
    arr, _ = load_rgb(root / f"{CLASS_B}/zqx_cmyk.jpg", SIZE)
    ref, _ = load_rgb(_png(tmp_path, structured_rgb(64, 48, seed=11), "ref.png"), SIZE)
    assert _mad(arr, ref) < 8  # JPEG loss only; an inverted or channel-swapped CMYK is ~100 off


@pytest.mark.parametrize(("name", "fmt", "seed", "size", "tolerance"), [
    ("zqx_bitmap.bmp", "BMP", 8, (45, 45), 0),
    ("zqx_tagged.tiff", "TIFF", 9, (70, 40), 0),
    ("zqx_modern.webp", "WEBP", 10, (64, 48), 0),
    ("zqx_indexed.gif", "GIF", 7, (60, 50), 0),
])
def test_other_formats_decode_to_the_same_pixels(bad_folder, tmp_path, name, fmt, seed, size, tolerance):
    root, _ = bad_folder
    arr, _ = load_rgb(root / CLASS_B / name, SIZE)
    src = structured_rgb(*size, seed=seed)
    if fmt == "GIF":
        src = src.quantize(64).convert("RGB")
    ref, _ = load_rgb(_png(tmp_path, src, "ref.png"), SIZE)
    assert _mad(arr, ref) <= tolerance


@pytest.mark.parametrize(("orientation", "right", "wrong"), [
    (6, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90),  # 6: display rotated 90 deg clockwise
    (8, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270),
], ids=["orientation6", "orientation8"])
def test_exif_orientation_applied(bad_folder, tmp_path, orientation, right, wrong):
    root, _ = bad_folder
    name = {6: "zqx_exif_six.jpg", 8: "zqx_exif_eight.jpg"}[orientation]
    arr, notes = load_rgb(root / CLASS_B / name, SIZE)
    assert any("EXIF" in n for n in notes)
    src = halves(80, 48)
    expected, _ = load_rgb(_png(tmp_path, src.transpose(right), "right.png"), SIZE)
    rotated_wrong, _ = load_rgb(_png(tmp_path, src.transpose(wrong), "wrong.png"), SIZE)
    unrotated, _ = load_rgb(_png(tmp_path, src, "plain.png"), SIZE)
    assert _mad(arr, expected) < 8
    assert _mad(arr, rotated_wrong) > 40
    assert _mad(arr, unrotated) > 40


def test_decompression_bomb_not_allocated(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(30000, 30000))
    assert path.stat().st_size < 200
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(path, SIZE)


def test_bomb_refused_while_another_thread_loads(tmp_path, monkeypatch):
    """Force the interleaving a thread pool produces: A enters, B enters, A leaves, B opens the bomb."""
    good = _png(tmp_path, structured_rgb(40, 40, seed=21), "good.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(10000, 9000))  # 9.0e7 pixels: just over the 8.9e7 warning limit
    real_open = Image.open
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def gated_open(fp, *args, **kwargs):
        if Path(fp) == good:
            a_inside.set()
            b_inside.wait(10)
        else:
            b_inside.set()
            a_done.wait(10)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", gated_open)
    filters_before = list(warnings.filters)
    result: dict[str, object] = {}

    def run_a():
        try:
            load_rgb(good, SIZE)
        finally:
            a_done.set()

    def run_b():
        try:
            result["b"] = load_rgb(bomb, SIZE)
        except BadImage as exc:
            result["b"] = str(exc)

    ta = threading.Thread(target=run_a)
    ta.start()
    assert a_inside.wait(10)
    tb = threading.Thread(target=run_b)
    tb.start()
    ta.join(20)
    tb.join(20)
    leaked = list(warnings.filters)
    warnings.filters[:] = filters_before  # undo any leak before asserting
    assert isinstance(result.get("b"), str) and "decompression bomb" in result["b"], result.get("b")
    assert leaked == filters_before


# --- 2. scan_image_folder ---------------------------------------------------------------------------

def test_scan_bad_folder(bad_folder):
    root, _ = bad_folder
    scan = scan_image_folder(root)
    assert scan.classes == (CLASS_B, CLASS_A)  # sorted folder names
    assert [im.relpath for im in scan.images] == LOADED
    assert {rel for rel, _ in scan.skipped} == SCAN_SKIPPED
    assert all("suffix" in why and "allowed" in why for _, why in scan.skipped)
    assert dict(scan.skipped)[f"{CLASS_B}/zqx_vector.svg"].startswith("suffix .svg")
    for im in scan.images:
        assert im.label == scan.classes.index(im.relpath.split("/")[0])
        assert im.path == root / im.relpath


def _touch_images(root: Path, rels: list[str]) -> None:
    for i, rel in enumerate(rels):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        structured_rgb(20, 20, seed=100 + i).save(path, "PNG")


def test_scan_order_stable_and_hidden_ignored(tmp_path):
    root = tmp_path / "data"
    rels = ["b/z.png", "a/m.png", "b/a.png", "a/sub/q.png", "a/B.png", "a/a.png", "b/10.png", "b/9.png"]
    _touch_images(root, rels)
    _touch_images(root, ["a/.hidden.png", "a/.cache/x.png", ".trash/y.png"])
    (root / "loose.png").write_bytes(b"x")
    first = scan_image_folder(root)
    got = [im.relpath for im in first.images]
    assert got == ["a/B.png", "a/a.png", "a/m.png", "a/sub/q.png", "b/10.png", "b/9.png", "b/a.png", "b/z.png"]
    assert first.classes == ("a", "b")
    assert [im.label for im in first.images] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert first.skipped == [("loose.png", "file outside any class folder")]
    second = scan_image_folder(root)
    assert second == first


def test_scan_labels_follow_class_list(tmp_path):
    root = tmp_path / "data"
    _touch_images(root, ["cat/1.png", "dog/1.png", "dog/2.png"])
    scan = scan_image_folder(root, ("dog", "bird", "cat"))
    assert scan.classes == ("dog", "bird", "cat")
    assert [(im.relpath, im.label) for im in scan.images] == [("cat/1.png", 2), ("dog/1.png", 0), ("dog/2.png", 0)]


def test_scan_unknown_class_folder(tmp_path):
    root = tmp_path / "data"
    _touch_images(root, ["cat/1.png", "ferret/1.png"])
    with pytest.raises(DataFolderError, match="ferret"):
        scan_image_folder(root, ("cat", "dog"))


def test_scan_missing_or_flat_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataFolderError, match=re.escape(str(missing))):
        scan_image_folder(missing)
    flat = tmp_path / "flat"
    flat.mkdir()
    structured_rgb(20, 20, seed=1).save(flat / "x.png")
    with pytest.raises(DataFolderError, match="class sub-folders"):
        scan_image_folder(flat)
    with pytest.raises(DataFolderError, match=re.escape(str(flat / "x.png"))):
        scan_image_folder(flat / "x.png")


# --- 3. owner-agent encrypt end to end --------------------------------------------------------------

def _encrypt(data: Path, out: Path, *extra: str) -> int:
    return main(["encrypt", "--key", "alice", "--data", str(data), "--out", str(out), "--no-progress",
                 "--accept-cloud-can-decrypt", *extra])


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("OWNER_AGENT_HOME", str(home))
    return home


@pytest.fixture
def encrypted_bad(tmp_path, home, capsys):
    data = tmp_path / "data"
    expected = make_bad_folder(data)
    out = tmp_path / "out"
    rc = _encrypt(data, out, "--max-bad-fraction", "1")
    err = capsys.readouterr().err
    return data, out, expected, rc, err


def test_encrypt_bad_folder(encrypted_bad, home):
    data, out, expected, rc, err = encrypted_bad
    assert rc == 0, err
    assert (home / "keys" / "alice.key").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    usable = [rel for rel, outcome in expected.items() if outcome in ("ok", "converted")]
    assert manifest["count"] == len(usable) == 16
    assert manifest["classes"] == [CLASS_B, CLASS_A]
    assert manifest["class_counts"] == [
        sum(rel.startswith(f"{c}/") for rel in usable) for c in manifest["classes"]]
    assert sum(s["count"] for s in manifest["shards"]) == manifest["count"]

    report = json.loads((out / "local" / "report.json").read_text())
    skipped = {e["file"]: e["reason"] for e in report["skipped"]}
    assert len(skipped) == len(report["skipped"])  # each file once
    assert set(skipped) == {rel for rel, outcome in expected.items() if outcome == "skipped"}
    for rel, reason in skipped.items():
        assert SPEC[rel][1] in reason, (rel, reason)
    converted = {e["file"]: e["notes"] for e in report["converted"]}
    for rel, outcome in expected.items():
        if outcome == "converted":
            assert any(SPEC[rel][1] in n for n in converted[rel]), (rel, converted.get(rel))
    assert report["summary"]["images"] == 16 and report["summary"]["skipped"] == len(skipped)
    assert f"{len(skipped)} file(s) not used" in err

    index = [json.loads(line) for line in (out / "local" / "index.jsonl").read_text().splitlines()]
    assert sorted(e["file"] for e in index) == sorted(usable)


def test_encrypt_leaks_no_file_names(encrypted_bad):
    data, out, expected, rc, _ = encrypted_bad
    assert rc == 0
    uploaded = [out / "manifest.json"] + sorted(out.glob("shard-*.tar"))
    assert len(uploaded) >= 2
    blob = b"".join(p.read_bytes() for p in uploaded)
    assert b"zqx" not in blob  # every source file name starts with zqx_
    for rel in expected:
        assert Path(rel).name.encode() not in blob and Path(rel).stem.encode() not in blob
    assert str(data).encode() not in blob and str(data.parent).encode() not in blob
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert re.fullmatch(r"[0-9a-f]{32}\.(jpg|cls)", m.name), m.name
                assert m.mtime == 0 and m.uname == "" and m.gname == ""
                if m.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as img:
                        assert img.size == (SIZE, SIZE) and not img.getexif()


def test_encrypt_report_converted_is_exact(encrypted_bad):
    _, out, expected, rc, _ = encrypted_bad
    assert rc == 0
    report = json.loads((out / "local" / "report.json").read_text())
    assert {e["file"] for e in report["converted"]} == {r for r, o in expected.items() if o == "converted"}


def test_encrypt_stops_when_most_files_are_bad(tmp_path, home, capsys):
    data = tmp_path / "data"
    (data / "empty").mkdir(parents=True)
    for i in range(150):
        (data / "empty" / f"e{i:03d}.jpg").write_bytes(b"")
    _touch_images(data, [f"fine/g{i}.png" for i in range(10)])
    out = tmp_path / "out"
    rc = _encrypt(data, out)  # default --max-bad-fraction 0.2
    err = capsys.readouterr().err
    assert rc != 0
    report_path = out / "local" / "report.json"
    assert "stopped" in err and str(report_path) in err
    assert report_path.is_file()
    report = json.loads(report_path.read_text())
    assert len(report["skipped"]) == 150
    assert all(e["reason"].startswith("empty") for e in report["skipped"])
    assert not (out / "manifest.json").exists()  # an outbox without a manifest is incomplete


def test_encrypt_few_bad_files_pass_the_default_threshold(tmp_path, home, capsys):
    data = tmp_path / "data"
    _touch_images(data, [f"fine/g{i:03d}.png" for i in range(110)])
    for i in range(10):
        (data / "fine" / f"e{i}.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert _encrypt(data, out) == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["count"] == 110


def test_encrypt_stops_when_no_file_is_an_image(tmp_path, home, capsys):
    data = tmp_path / "data"
    (data / "phone").mkdir(parents=True)
    for i in range(150):
        (data / "phone" / f"IMG_{i:04d}.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    out = tmp_path / "out"
    rc = _encrypt(data, out)
    err = capsys.readouterr().err
    assert rc != 0 and "stopped" in err


def test_encrypt_cli_errors_name_the_folder(tmp_path, home, capsys):
    missing = tmp_path / "no-such-folder"
    assert _encrypt(missing, tmp_path / "out1") == 1
    assert str(missing) in capsys.readouterr().err
    data = tmp_path / "data"
    _touch_images(data, ["cat/1.png", "ferret/1.png"])
    assert _encrypt(data, tmp_path / "out2", "--classes", "cat,dog") == 1
    err = capsys.readouterr().err
    assert "ferret" in err and "error" in err
    assert not (tmp_path / "out2" / "manifest.json").exists()


# --- 4. resize and centre crop ----------------------------------------------------------------------

def _framed(width: int, height: int) -> Image.Image:
    """Blue where the centre square crop will be, red outside it (on the long axis)."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[...] = (230, 10, 10)
    side = min(width, height)
    if width >= height:
        x0 = (width - side) // 2
        arr[:, x0 : x0 + side] = (10, 10, 230)
    else:
        y0 = (height - side) // 2
        arr[y0 : y0 + side, :] = (10, 10, 230)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("wh", [(300, 200), (200, 300), (1200, 800)])
def test_centre_crop(tmp_path, fmt, wh):
    path = tmp_path / f"framed.{fmt.lower()}"
    _framed(*wh).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    arr, _ = load_rgb(path, SIZE)
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8
    blue = (arr[..., 2].astype(int) > 150) & (arr[..., 0].astype(int) < 100)
    # a squashed (not cropped) image would be 1/3 red, an off-centre crop 1/4 red
    assert blue.mean() > 0.93, blue.mean()
    assert blue[:, SIZE // 2 - 4 : SIZE // 2 + 4].all()


def test_centre_crop_thirds(tmp_path):
    """The brief's picture: 300x200, left and right thirds red, centre blue -> the crop is half blue,
    centred; a squash would put blue only in the middle third."""
    arr = np.full((200, 300, 3), (230, 10, 10), np.uint8)
    arr[:, 100:200] = (10, 10, 230)
    arr, _ = load_rgb(_png(tmp_path, Image.fromarray(arr), "thirds.png"), SIZE)
    blue_cols = ((arr[..., 2] > 150) & (arr[..., 0] < 100)).all(axis=0)
    assert blue_cols.sum() >= 14 and blue_cols[8:24].all() and not blue_cols[:6].any() and not blue_cols[-6:].any()


@pytest.mark.parametrize("size", [8, 32, 224])
def test_resize_to_any_size(tmp_path, size):
    arr, _ = load_rgb(_png(tmp_path, structured_rgb(40, 60, seed=31), "small.png"), size)
    assert arr.shape == (size, size, 3) and arr.dtype == np.uint8


def test_exact_size_is_untouched(tmp_path):
    src = structured_rgb(SIZE, SIZE, seed=32)
    arr, notes = load_rgb(_png(tmp_path, src, "exact.png"), SIZE)
    assert np.array_equal(arr, np.asarray(src))
