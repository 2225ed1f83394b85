"""`owner-agent encrypt / decrypt / preview` end to end on the shipped sample."""
import base64
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owners.cli import main
from owners.images import load_rgb
from owners.keys import write_key_file
from protocol.codec import decode
from protocol.shards import Manifest, iter_samples

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample" / "test"
# A recognisable secret: if any of its encodings shows up anywhere, the key leaked.
CANARY = b"CANARY-secret-0123456789abcdefgh"


@pytest.fixture(autouse=True)
def owner_home(tmp_path, monkeypatch):
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def encrypt(tmp_path, name, *extra, key="alice"):
    out = tmp_path / name
    args = ["encrypt", "--data", str(SAMPLE), "--out", str(out), "--no-progress", *extra,
            "--accept-cloud-can-decrypt"]
    if "--plain" not in extra:
        args += ["--key", key]
    assert main(args) == 0
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_outbox_layout_and_manifest(tmp_path):
    out = encrypt(tmp_path, "o1", "--shard-images", "64")
    manifest = Manifest.load(out)
    assert manifest.count == 200 and manifest.class_counts == [20] * 10
    assert [s.count for s in manifest.shards] == [64, 64, 64, 8]
    assert manifest.scheme == "color" and manifest.block_size == 16 and manifest.image_size == 32
    assert manifest.key_id and len(manifest.key_id) == 16
    names = set()
    for shard in manifest.shards:
        with tarfile.open(out / shard.name) as tar:
            for m in tar.getmembers():
                assert m.mtime == 0 and m.uname == "" and m.uid == 0
                names.add(m.name)
    assert len(names) == 400 and all(n.endswith((".jpg", ".cls")) for n in names)
    # source file names stay local
    uploaded = b"".join(folder_bytes(out).values())
    # relative paths ("airplane/4980.jpg") cannot occur by chance in hex ids
    source_names = {str(p.relative_to(SAMPLE)).encode() for p in SAMPLE.rglob("*.jpg")} | {str(SAMPLE).encode()}
    assert not [n for n in source_names if n in uploaded]
    index = [json.loads(line) for line in (out / "local" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 200 and index[0]["file"].startswith("airplane/")


def test_same_inputs_and_key_give_byte_identical_shards(tmp_path):
    a = folder_bytes(encrypt(tmp_path, "a"))
    b = folder_bytes(encrypt(tmp_path, "b"))
    assert a == b
    c = folder_bytes(encrypt(tmp_path, "c", key="bob"))
    assert c["shard-00000.tar"] != a["shard-00000.tar"]
    plain = Manifest.load(encrypt(tmp_path, "p", "--plain"))
    assert plain.key_id is None and plain.scheme == "plain"


def test_colour_png_decrypts_bit_exactly_to_the_prepared_images(tmp_path):
    out = encrypt(tmp_path, "png", "--format", "png")
    restored = tmp_path / "restored"
    assert main(["decrypt", "--key", "alice", "--shards", str(out), "--out", str(restored)]) == 0
    index = [json.loads(line) for line in (out / "local" / "index.jsonl").read_text().splitlines()]
    manifest = Manifest.load(out)
    for entry in index:
        got = np.asarray(Image.open(restored / manifest.classes[entry["label"]] / f"{entry['id']}.png"))
        assert np.array_equal(got, load_rgb(SAMPLE / entry["file"], 32)[0])


def test_gray_scheme_stores_grey_images_and_decrypts_within_rounding(tmp_path):
    out = encrypt(tmp_path, "gray", "--scheme", "gray", "--format", "png")
    manifest = Manifest.load(out)
    assert manifest.scheme == "gray" and manifest.block_size == 8
    _, data, _ = next(iter_samples(out / manifest.shards[0].name))
    assert decode(data).shape == (32, 96)
    restored = tmp_path / "restored"
    assert main(["decrypt", "--key", "alice", "--shards", str(out), "--out", str(restored)]) == 0
    index = [json.loads(line) for line in (out / "local" / "index.jsonl").read_text().splitlines()]
    err = [np.mean((np.asarray(Image.open(restored / manifest.classes[e["label"]] / f"{e['id']}.png")).astype(float)
                    - load_rgb(SAMPLE / e["file"], 32)[0]) ** 2) for e in index]
    assert 10 * np.log10(255**2 / np.mean(err)) >= 40


def test_decrypt_with_the_wrong_key_is_refused(tmp_path, capsys):
    out = encrypt(tmp_path, "o")
    encrypt(tmp_path, "o2", key="bob")  # creates bob
    capsys.readouterr()
    assert main(["decrypt", "--key", "bob", "--shards", str(out), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert Manifest.load(out).key_id in err and "bob" in err


def test_corrupted_shard_is_named(tmp_path, capsys):
    out = encrypt(tmp_path, "o")
    shard = out / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["decrypt", "--key", "alice", "--shards", str(out), "--out", str(tmp_path / "r")]) == 1
    assert "shard-00000.tar" in capsys.readouterr().err


def test_existing_outbox_is_not_overwritten_without_asking(tmp_path, capsys):
    out = encrypt(tmp_path, "o")
    before = folder_bytes(out)
    assert main(["encrypt", "--key", "alice", "--data", str(SAMPLE), "--out", str(out), "--no-progress",
                 "--accept-cloud-can-decrypt"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert folder_bytes(out) == before


@pytest.mark.parametrize("args, words", [
    (["--size", "40"], "not a multiple of the block size 16"),
    (["--scheme", "gray", "--block", "12"], "not a multiple of the block size 12"),
    (["--quality", "0"], "quality"),
])
def test_bad_arguments_get_clear_errors(tmp_path, capsys, args, words):
    assert main(["encrypt", "--key", "alice", "--data", str(SAMPLE), "--out", str(tmp_path / "x"),
                 "--no-progress", "--accept-cloud-can-decrypt", *args]) == 1
    assert words in capsys.readouterr().err


def test_unknown_class_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["encrypt", "--key", "alice", "--data", str(SAMPLE), "--out", str(tmp_path / "x"),
                 "--classes", "airplane,automobile", "--no-progress", "--accept-cloud-can-decrypt"]) == 1
    assert "bird" in capsys.readouterr().err


def test_preview_grid(tmp_path):
    out = tmp_path / "preview.png"
    assert main(["preview", "--key", "alice", "--data", str(SAMPLE), "--out", str(out), "--count", "4"]) == 0
    img = Image.open(out)
    scale = 128 // 32
    assert img.size == ((3 * 32 + 2 * 2) * scale, 4 * (32 + 2) * scale)


def test_canary_key_never_leaves_the_key_file(tmp_path, capsys, caplog, owner_home):
    write_key_file(owner_home / "keys" / "canary.key", CANARY, origin="test")
    needles = [CANARY, CANARY.hex().encode(), base64.b64encode(CANARY), CANARY.hex().upper().encode()]
    out = encrypt(tmp_path, "o", key="canary")
    main(["preview", "--key", "canary", "--data", str(SAMPLE), "--out", str(tmp_path / "prev.png")])
    main(["decrypt", "--key", "canary", "--shards", str(out), "--out", str(tmp_path / "dec")])
    main(["keys"])
    captured = capsys.readouterr()
    texts = [captured.out.encode(), captured.err.encode(), caplog.text.encode()]
    for root, _, files in os.walk(tmp_path):
        for f in files:
            path = Path(root) / f
            if path.suffix != ".key":
                texts.append(path.read_bytes())
    for blob in texts:
        for needle in needles:
            assert needle not in blob


def test_worker_processes_give_the_same_outbox_as_one_process(tmp_path):
    from owners.encrypt import EncryptSettings, encrypt_folder
    from owners.keys import OwnerKey

    key = OwnerKey("k", bytes(range(32)))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        settings = EncryptSettings(chunk=16, workers=workers, shard_images=50)
        summary = encrypt_folder(SAMPLE, out, key, settings, progress=False)
        assert summary.images == 200
        outs.append(folder_bytes(out))
    assert outs[0] == outs[1] and len(outs[0]) == 5  # 4 shards + manifest
