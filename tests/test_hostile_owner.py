"""A malicious owner uploads shards whose manifest adds up and whose sha256 matches, but whose
content would crash or stall training. The store looks inside every shard before it becomes
visible: each is refused with a message naming the problem, nothing of it is stored, and the
other owners' data and training are untouched."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owners.errors import ServiceError
from owners.upload import upload_outbox
from protocol.codec import Codec, CodecError, check_encoded
from protocol.shards import Manifest, ShardWriter, sample_id
from tests import test_ingest
from tests.badfiles import bomb_png
from tests.test_ingest import CLASSES, KEY_A, client

server, outboxes = test_ingest.server, test_ingest.outboxes  # the ingest tests' fixtures, by name

RNG = np.random.default_rng(0)


def image(size: int = 32, codec: Codec | None = None) -> bytes:
    return (codec or Codec()).encode(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8))


def tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "TIFF")
    return buffer.getvalue()


def crafted_outbox(folder: Path, samples: list[tuple[bytes, int]], declared: int | None = None) -> Path:
    """An outbox whose manifest is consistent with itself (counts add up, sha256 right) whatever
    the samples hold; ``declared`` overrides the image count the manifest claims."""
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "jpg", 1000)
    for data, label in samples:
        writer.add(sample_id(data), data, label)
    shards = writer.close()
    count = declared if declared is not None else len(samples)
    shards[0].count = count
    Manifest(key_id=KEY_A.key_id, scheme="color", image_size=32, block_size=16, codec=Codec().__dict__,
             classes=list(CLASSES), split="train", count=count, class_counts=[count] + [0] * (len(CLASSES) - 1),
             shards=shards).write(folder)
    return folder


CASES = {
    "label out of range": ([(image(), 0), (image(), 99)], None, "label 99"),
    "image of the wrong size": ([(image(), 0), (image(64), 1)], None, "64x64"),
    "a PNG in a JPEG task": ([(image(codec=Codec("png")), 0)], None, "jpeg"),
    "a TIFF": ([(tiff(), 0)], None, "jpeg"),
    "a decompression bomb": ([(bomb_png(40000, 40000), 0)], None, "jpeg"),  # refused by format, undecoded
    "garbage bytes": ([(os.urandom(500), 0)], None, "jpeg"),
    "more images declared than held": ([(image(), 0)], 1_000_000, "manifest says 1000000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_shard_is_refused_and_nothing_of_it_is_stored(server, tmp_path, case):
    samples, declared, words = CASES[case]
    outbox = crafted_outbox(tmp_path / "outbox", samples, declared)
    c = client(server)
    try:
        with pytest.raises(ServiceError, match=f"INVALID_ARGUMENT.*refused: .*{words}"):
            upload_outbox(outbox, c, progress=False)
    finally:
        c.close()
    assert not [p for p in (server.root / "objects").rglob("*") if p.is_file()]
    assert not [p for p in (server.root / "incoming").rglob("*") if p.is_file()]  # the partial file is gone too
    assert server.store.committed_datasets() == []


def test_a_shard_that_is_not_a_tar_is_refused(server, tmp_path):
    outbox = crafted_outbox(tmp_path / "outbox", [(image(), 0)])
    manifest = Manifest.load(outbox)
    shard = outbox / manifest.shards[0].name
    shard.write_bytes(os.urandom(shard.stat().st_size))  # same size, new content: re-declare its hash
    import hashlib

    manifest.shards[0].sha256 = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest.write(outbox)
    c = client(server)
    try:
        with pytest.raises(ServiceError, match="refused: not a tar archive"):
            upload_outbox(outbox, c, progress=False)
    finally:
        c.close()


def test_a_bomb_is_refused_from_its_header_in_its_own_format():
    with pytest.raises(CodecError, match="decompression bomb"):
        check_encoded(bomb_png(40000, 40000), "png", (32, 32), 3)


def test_honest_owners_still_upload_after_a_refusal(server, tmp_path, outboxes):
    crafted = crafted_outbox(tmp_path / "outbox", [(image(), 99)])
    c = client(server)
    try:
        with pytest.raises(ServiceError):
            upload_outbox(crafted, c, progress=False)
        state = upload_outbox(outboxes.a, c, progress=False)
    finally:
        c.close()
    assert state.committed and state.images == 200


def test_a_full_catalog_is_resource_exhausted_not_a_rollback_error(server, tmp_path, outboxes):
    """One owner filling the disk must not turn every other owner's request into 'cannot rollback': the
    owner is told the disk is full (RESOURCE_EXHAUSTED: a person must act), and once there is room
    the same upload goes through."""
    import shutil

    from orchestrator.errors import StorageFull

    outbox = tmp_path / "outbox"
    shutil.copytree(outboxes.a, outbox)
    doc = json.loads((outbox / "manifest.json").read_text())
    (outbox / "manifest.json").write_text(json.dumps({**doc, "producer": "x" * 20_000}))  # needs new pages
    store = server.store
    pages = store._query("PRAGMA page_count")[0][0]
    store._query(f"PRAGMA max_page_count = {pages}")  # the catalog cannot grow: SQLite says "full"
    with pytest.raises(StorageFull, match="disk is full"):
        store.open_dataset("hospital-a", (outbox / "manifest.json").read_bytes())
    c = client(server)
    try:
        with pytest.raises(ServiceError, match="RESOURCE_EXHAUSTED: the server's disk is full"):
            upload_outbox(outbox, c, progress=False)
        store._query("PRAGMA max_page_count = 1073741823")  # room again: the same upload goes through
        assert upload_outbox(outbox, c, progress=False).committed
    finally:
        c.close()
