"""Generate an image folder full of awkward files, for the image-loading tests.

``make_bad_folder(root)`` writes ``root/<class>/<file>`` and returns ``{relpath: outcome}`` where
outcome is ``"ok"`` (loaded, no conversion note), ``"converted"`` (loaded, with a note) or
``"skipped"`` (refused, with a reason). ``SPEC`` holds the same outcomes plus, for refused files,
a word the reason must contain. Everything is made here, at test time; nothing is downloaded.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Class folder names; file names below never contain them, so a leak of one is easy to spot.
CLASS_A = "kestrel"
CLASS_B = "heron"

# relpath -> (outcome, keyword): for "skipped" a word of the reason, for "converted" a word of a note
SPEC: dict[str, tuple[str, str | None]] = {
    # good images
    f"{CLASS_A}/zqx_small_rgb.jpg": ("ok", None),
    f"{CLASS_A}/zqx_large_rgb.jpg": ("ok", None),
    f"{CLASS_A}/zqx_greyscale.png": ("ok", None),
    f"{CLASS_A}/zqx_opaque_rgba.png": ("converted", "alpha"),  # RGBA: "alpha composited" note
    f"{CLASS_A}/zqx_uppercase.JPG": ("ok", None),
    f"{CLASS_A}/zqx_pngcontent.jpg": ("ok", None),  # PNG bytes behind a .jpg suffix
    f"{CLASS_B}/zqx_indexed.gif": ("ok", None),
    f"{CLASS_B}/zqx_bitmap.bmp": ("ok", None),
    f"{CLASS_B}/zqx_tagged.tiff": ("ok", None),
    f"{CLASS_B}/zqx_modern.webp": ("ok", None),
    # awkward but usable
    f"{CLASS_B}/zqx_cmyk.jpg": ("converted", "CMYK"),
    f"{CLASS_B}/zqx_sixteen_bit.png": ("converted", "16-bit"),
    f"{CLASS_B}/zqx_palette_transparent.png": ("converted", "alpha"),
    f"{CLASS_B}/zqx_exif_six.jpg": ("converted", "EXIF orientation"),
    f"{CLASS_B}/zqx_exif_eight.jpg": ("converted", "EXIF orientation"),
    f"{CLASS_B}/zqx_animated.gif": ("converted", "multi-frame"),  # multi-frame: first frame used
    # refused by load_rgb
    f"{CLASS_A}/zqx_truncated.jpg": ("skipped", "decode"),
    f"{CLASS_A}/zqx_zero_bytes.jpg": ("skipped", "empty"),
    f"{CLASS_A}/zqx_text_renamed.png": ("skipped", "not an image"),
    f"{CLASS_B}/zqx_bomb_huge.png": ("skipped", "decompression bomb"),  # > 2x MAX_IMAGE_PIXELS: error
    f"{CLASS_B}/zqx_bomb_warn.png": ("skipped", "decompression bomb"),  # 1x..2x: Pillow only warns
    f"{CLASS_B}/zqx_portable_pixmap.png": ("skipped", "not allowed"),  # PPM: format outside the allow-list
    # refused at scan time (suffix)
    f"{CLASS_A}/zqx_notes.txt": ("skipped", "suffix"),
    f"{CLASS_B}/zqx_vector.svg": ("skipped", "suffix"),
    f"{CLASS_B}/zqx_no_suffix": ("skipped", "suffix"),
}
SCAN_SKIPPED = {rel for rel, (_, why) in SPEC.items() if why == "suffix"}


def structured_rgb(width: int, height: int, seed: int) -> Image.Image:
    """A smooth gradient with a few solid shapes: photo-like structure, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([
        255 * x / max(1, width - 1),
        255 * y / max(1, height - 1),
        np.full_like(x, float(rng.integers(40, 200))),
    ], axis=-1)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        x1, y1 = x0 + max(4, width // 4), y0 + max(4, height // 4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.integers(2):
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return img


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue, with a green bar at the top of the left half.

    Every rotation and mirror of it looks different, so a wrong EXIF transpose is visible.
    """
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (220, 20, 20)
    arr[:, width // 2 :] = (20, 20, 220)
    arr[: height // 4, : width // 2] = (20, 200, 20)
    return Image.fromarray(arr, "RGB")


def sixteen_bit_gradient(width: int = 48, height: int = 64) -> Image.Image:
    """Mode I;16, a horizontal ramp over the whole 0..65535 range (along the short side, so the
    centre crop keeps all of it)."""
    ramp = np.rint(np.linspace(0, 65535, width)).astype(np.uint16)
    img = Image.fromarray(np.ascontiguousarray(np.tile(ramp, (height, 1))))
    assert img.mode == "I;16", img.mode
    return img


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width`` x ``height`` 1-bit pixels (never allocated here)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    idat = zlib.compress(b"\x00" * 64)  # a few filter bytes; far too little data for the header
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_bytes(img: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **save_args)
    return buf.getvalue()


def exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def palette_with_transparency(width: int = 48, height: int = 40) -> Image.Image:
    """Mode P: left half index 0 (black in the palette, but transparent), right half index 1 (blue)."""
    idx = np.zeros((height, width), np.uint8)
    idx[:, width // 2 :] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 20, 40, 230] + [0, 0, 0] * 254)
    img.info["transparency"] = 0
    return img


def _save(img: Image.Image, fmt: str, **args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **args)
    return buf.getvalue()


def make_bad_folder(root: Path) -> dict[str, str]:
    """Write every file of :data:`SPEC` under ``root``; return ``{relpath: outcome}``."""
    root = Path(root)
    files: dict[str, bytes] = {}
    a, b = CLASS_A, CLASS_B

    full_jpeg = jpeg_bytes(structured_rgb(300, 200, seed=2))
    files[f"{a}/zqx_small_rgb.jpg"] = jpeg_bytes(structured_rgb(40, 60, seed=1))
    files[f"{a}/zqx_large_rgb.jpg"] = full_jpeg
    grey = structured_rgb(50, 70, seed=3).convert("L")
    files[f"{a}/zqx_greyscale.png"] = _save(grey, "PNG")
    rgba = structured_rgb(64, 64, seed=4).convert("RGBA")  # alpha 255 everywhere
    files[f"{a}/zqx_opaque_rgba.png"] = _save(rgba, "PNG")
    files[f"{a}/zqx_uppercase.JPG"] = jpeg_bytes(structured_rgb(90, 45, seed=5))
    files[f"{a}/zqx_pngcontent.jpg"] = _save(structured_rgb(33, 77, seed=6), "PNG")
    files[f"{b}/zqx_indexed.gif"] = _save(structured_rgb(60, 50, seed=7).quantize(64), "GIF")
    files[f"{b}/zqx_bitmap.bmp"] = _save(structured_rgb(45, 45, seed=8), "BMP")
    files[f"{b}/zqx_tagged.tiff"] = _save(structured_rgb(70, 40, seed=9), "TIFF")
    files[f"{b}/zqx_modern.webp"] = _save(structured_rgb(64, 48, seed=10), "WEBP", lossless=True)

    cmyk = structured_rgb(64, 48, seed=11).convert("CMYK")
    files[f"{b}/zqx_cmyk.jpg"] = jpeg_bytes(cmyk)
    files[f"{b}/zqx_sixteen_bit.png"] = _save(sixteen_bit_gradient(), "PNG")
    files[f"{b}/zqx_palette_transparent.png"] = _save(palette_with_transparency(), "PNG", transparency=0)
    files[f"{b}/zqx_exif_six.jpg"] = exif_jpeg(halves(80, 48), 6)
    files[f"{b}/zqx_exif_eight.jpg"] = exif_jpeg(halves(80, 48), 8)
    frames = [structured_rgb(40, 40, seed=s).quantize(32) for s in (12, 13, 14)]
    files[f"{b}/zqx_animated.gif"] = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)

    files[f"{a}/zqx_truncated.jpg"] = full_jpeg[: len(full_jpeg) // 2]
    files[f"{a}/zqx_zero_bytes.jpg"] = b""
    files[f"{a}/zqx_text_renamed.png"] = b"this is a shopping list, not a picture\nmilk\neggs\n" * 5
    files[f"{b}/zqx_bomb_huge.png"] = bomb_png(30000, 30000)  # 9e8 pixels > 2 * 89.5e6
    files[f"{b}/zqx_bomb_warn.png"] = bomb_png(10000, 10000)  # 1e8 pixels: between 1x and 2x the limit
    files[f"{b}/zqx_portable_pixmap.png"] = _save(structured_rgb(20, 20, seed=15), "PPM")
    files[f"{a}/zqx_notes.txt"] = b"notes about the photos\n"
    files[f"{b}/zqx_vector.svg"] = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                                    b'<rect width="10" height="10" fill="red"/></svg>\n')
    files[f"{b}/zqx_no_suffix"] = _save(structured_rgb(20, 20, seed=16), "PNG")

    assert set(files) == set(SPEC), set(files) ^ set(SPEC)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {rel: outcome for rel, (outcome, _) in SPEC.items()}
