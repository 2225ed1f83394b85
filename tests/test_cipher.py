"""The EtC cipher: golden vectors, exact inverses, true permutations, batch consistency."""
import hashlib
import hmac
import itertools
from pathlib import Path

import numpy as np
import pytest

from owners.cipher import (
    CHANNEL_ORDERS,
    BlockCipher,
    CipherGeometry,
    GeometryError,
    derive_schedule,
    encrypt_reference,
    rgb_to_stacked_ycbcr,
    split_blocks,
    transform_block,
)
from owners.images import load_rgb, scan_image_folder
from owners.keys import KeyStream
from protocol.codec import Codec, decode, psnr

SECRET = bytes(range(32))
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample" / "test"


def sample_images(size: int = 32, count: int = 40) -> np.ndarray:
    items = scan_image_folder(SAMPLE).images[::5][:count]
    return np.stack([load_rgb(item.path, size)[0] for item in items])


def schedule_digest(schedule) -> str:
    h = hashlib.sha256()
    for arr in (schedule.source, schedule.transform, schedule.negate, schedule.channel_order):
        if arr is not None:
            h.update(np.asarray(arr, dtype="<i8").tobytes())
    return h.hexdigest()[:32]


def pattern_image(height: int, width: int) -> np.ndarray:
    return (np.arange(height * width * 3, dtype=np.int64) * 7919 % 256).astype(np.uint8).reshape(1, height, width, 3)


# ---------------------------------------------------------------- golden vectors (never change)


def test_key_stream_is_hmac_sha256_counter_stream():
    block0 = hmac.new(SECRET, b"golden" + (0).to_bytes(8, "big"), hashlib.sha256).digest()
    stream = KeyStream(SECRET, "golden")
    assert [stream.word() for _ in range(8)] == [int.from_bytes(block0[i:i + 4], "big") for i in range(0, 32, 4)]
    stream = KeyStream(SECRET, "golden")
    assert [stream.word() for _ in range(3)] == [3735776317, 4083780399, 1256548263]
    assert KeyStream(SECRET, "golden").permutation(10) == [2, 0, 1, 4, 3, 8, 5, 9, 6, 7]


def test_colour_32x32_schedule_golden():
    s = derive_schedule(SECRET, CipherGeometry(32, 32, 16, "color"))
    assert s.source.tolist() == [3, 0, 1, 2]
    assert s.transform.tolist() == [0, 6, 1, 5]
    assert s.negate.astype(int).tolist() == [0, 1, 0, 1]
    assert s.channel_order.tolist() == [1, 3, 3, 1]


@pytest.mark.parametrize(
    "geometry, schedule_sha, encrypted_sha",
    [
        (CipherGeometry(32, 32, 16, "color"), "2295f7e532dfd65201bef8862648461c", "caeff672e721168ade6a1c8a8d88675e"),
        (CipherGeometry(32, 32, 8, "gray"), "c64e26c95144e6008fc426f458ecf909", "626f458417c593c432c0a18ad956c1bf"),
        (CipherGeometry(224, 224, 16, "color"), "3312b965c6c15e7d407685d85a832c5e", "c46497db2b0a3a940f447b484f1d6d5a"),
    ],
)
def test_schedule_and_ciphertext_golden(geometry, schedule_sha, encrypted_sha):
    cipher = BlockCipher(SECRET, geometry)
    assert schedule_digest(cipher.schedule) == schedule_sha
    encrypted = cipher.encrypt(pattern_image(geometry.height, geometry.width))
    assert hashlib.sha256(encrypted.tobytes()).hexdigest()[:32] == encrypted_sha


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("geometry", [CipherGeometry(32, 32, 16, "color"), CipherGeometry(64, 48, 16, "color"),
                                      CipherGeometry(48, 32, 8, "color"), CipherGeometry(224, 224, 16, "color")])
def test_colour_compiled_matches_reference_and_inverts_exactly(geometry):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, geometry.height, geometry.width, 3), dtype=np.uint8)
    cipher = BlockCipher(SECRET, geometry)
    enc = cipher.encrypt(x)
    reference = np.stack([encrypt_reference(img, cipher.schedule, geometry.block) for img in x])
    assert np.array_equal(enc, reference)
    assert np.array_equal(cipher.decrypt(enc), x)
    assert not np.array_equal(enc, x)


def test_gray_compiled_matches_reference():
    geometry = CipherGeometry(32, 32, 8, "gray")
    x = sample_images()
    cipher = BlockCipher(SECRET, geometry)
    planes = rgb_to_stacked_ycbcr(x)[..., None]
    reference = np.stack([encrypt_reference(p, cipher.schedule, 8)[..., 0] for p in planes])
    assert np.array_equal(cipher.encrypt(x), reference)
    assert cipher.encrypt(x).shape == (len(x), 32, 96)


def test_colour_roundtrip_through_png_is_bit_exact_on_photos():
    x = sample_images(size=64)  # real photos, upsampled to 64x64 (16 blocks)
    cipher = BlockCipher(SECRET, CipherGeometry(64, 64, 16, "color"))
    png = Codec(format="png")
    stored = np.stack([decode(png.encode(e)) for e in cipher.encrypt(x)])
    assert np.array_equal(cipher.decrypt(stored), x)


def test_gray_roundtrip_through_png_within_ycbcr_rounding():
    x = sample_images()
    cipher = BlockCipher(SECRET, CipherGeometry(32, 32, 8, "gray"))
    png = Codec(format="png")
    stored = np.stack([decode(png.encode(e)) for e in cipher.encrypt(x)])
    assert stored.ndim == 3  # saved as single-channel grey images
    assert psnr(cipher.decrypt(stored), x) >= 40.0


# ---------------------------------------------------------------- each step is a true permutation


def test_block_scramble_is_a_permutation_and_codes_are_in_range():
    for geometry in (CipherGeometry(224, 224, 16, "color"), CipherGeometry(224, 224, 8, "gray")):
        s = derive_schedule(SECRET, geometry)
        assert sorted(s.source.tolist()) == list(range(geometry.num_blocks))
        assert set(s.transform.tolist()) == set(range(8))
        assert 0.4 < s.negate.mean() < 0.6
    assert derive_schedule(SECRET, CipherGeometry(224, 224, 8, "gray")).channel_order is None


def test_eight_distinct_block_transforms_each_a_pixel_permutation():
    block = np.arange(16 * 16).reshape(16, 16, 1)
    results = [transform_block(block, code) for code in range(8)]
    assert len({r.tobytes() for r in results}) == 8
    for r in results:
        assert sorted(r.ravel().tolist()) == list(range(256))


def test_channel_orders_are_the_six_true_permutations():
    assert sorted(CHANNEL_ORDERS) == sorted(itertools.permutations(range(3)))


def test_no_channel_duplicated_in_any_block():
    # every pixel holds three distinct values; after encryption each pixel must still hold
    # the same three values (or all three XOR 255), never a repeated one
    geometry = CipherGeometry(64, 64, 16, "color")
    x = np.empty((1, 64, 64, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 10, 100, 200
    enc = BlockCipher(SECRET, geometry).encrypt(x)[0]
    for block in split_blocks(enc, 16):
        values = {tuple(sorted(px)) for px in block.reshape(-1, 3).tolist()}
        assert values in ({(10, 100, 200)}, {(55, 155, 245)})
    # and the compiled index is a permutation of all bytes of the image
    cipher = BlockCipher(SECRET, geometry)
    assert np.array_equal(np.sort(cipher._enc_index), np.arange(64 * 64 * 3))


def test_same_key_same_transform_for_every_image_in_any_batch():
    x = sample_images()
    cipher = BlockCipher(SECRET, CipherGeometry(32, 32, 16, "color"))
    whole = cipher.encrypt(x)
    one_by_one = np.concatenate([cipher.encrypt(x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(whole, one_by_one)
    assert np.array_equal(BlockCipher(SECRET, CipherGeometry(32, 32, 16, "color")).encrypt(x), whole)


def test_different_keys_give_different_ciphertexts():
    x = sample_images()
    other = bytes(reversed(range(32)))
    for geometry in (CipherGeometry(32, 32, 16, "color"), CipherGeometry(32, 32, 8, "gray")):
        assert not np.array_equal(BlockCipher(SECRET, geometry).encrypt(x), BlockCipher(other, geometry).encrypt(x))


def test_encryption_hides_structure():
    # correlation between the plain and encrypted pixel values, over many real images
    x = sample_images(size=64)
    enc = BlockCipher(SECRET, CipherGeometry(64, 64, 16, "color")).encrypt(x)
    corr = np.corrcoef(x.reshape(len(x), -1).astype(float).ravel(), enc.reshape(len(x), -1).astype(float).ravel())[0, 1]
    assert abs(corr) < 0.3


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("height, width, block, scheme, words", [
    (30, 32, 16, "color", "height 30"), (32, 40, 16, "color", "width 40"),
    (8, 8, 16, "color", "height 8"), (32, 32, 16, "rot13", "unknown scheme"),
])
def test_geometry_errors_name_the_problem(height, width, block, scheme, words):
    with pytest.raises(GeometryError, match=words):
        CipherGeometry(height, width, block, scheme)


def test_wrong_batch_shape_is_a_clear_error():
    cipher = BlockCipher(SECRET, CipherGeometry(32, 32, 16, "color"))
    with pytest.raises(GeometryError, match="expected uint8 batch of shape"):
        cipher.encrypt(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(GeometryError, match="float32"):
        cipher.encrypt(np.zeros((2, 32, 32, 3), np.float32))
