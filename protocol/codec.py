"""The stored image codec: how an encrypted image becomes file bytes, and back.

Fixed encoder settings (no metadata, no optimisation passes, a fixed PNG level), so the same
pixels always give the same bytes: sample ids are hashes of these bytes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

CODECS = ("jpeg", "png")
CHROMA_SUBSAMPLING = {"420": 2, "444": 0}  # our name -> Pillow's `subsampling`
PNG_COMPRESS_LEVEL = 6  # zlib level: Pillow's default, fixed here so output never drifts


class CodecError(ValueError):
    """Codec settings out of range; the message names the setting."""


@dataclass(frozen=True)
class Codec:
    format: str = "jpeg"  # "jpeg" (lossy, small) or "png" (lossless)
    quality: int = 85  # JPEG quality 1-100 (paper: 85 and lossless)
    chroma: str = "420"  # JPEG chroma subsampling of colour images: "420" or "444"

    def __post_init__(self) -> None:
        if self.format not in CODECS:
            raise CodecError(f"unknown format {self.format!r}: choose one of {CODECS}")
        if not 1 <= self.quality <= 100:
            raise CodecError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.chroma not in CHROMA_SUBSAMPLING:
            raise CodecError(f"chroma must be one of {tuple(CHROMA_SUBSAMPLING)}, got {self.chroma!r}")

    @property
    def suffix(self) -> str:
        return "jpg" if self.format == "jpeg" else "png"

    def encode(self, image: np.ndarray) -> bytes:
        """(H, W, 3) or (H, W) uint8 -> file bytes with no metadata."""
        buf = io.BytesIO()
        pil = Image.fromarray(image)
        if self.format == "jpeg":
            pil.save(buf, "JPEG", quality=self.quality, subsampling=CHROMA_SUBSAMPLING[self.chroma],
                     optimize=False, progressive=False)
        else:
            pil.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buf.getvalue()


PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG"}  # our codec name -> what Pillow reports


def check_encoded(data: bytes, format: str, shape: tuple[int, int], channels: int) -> np.ndarray:
    """Refuse bytes that are not one image of the task's codec, size and mode, then decode them
    fully once and return the pixels (as ``decode``): the header is read first, so an oversized
    image (a decompression bomb) is refused before a single pixel is decoded. Raises CodecError
    saying what is wrong."""
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(io.BytesIO(data), formats=[PIL_FORMAT[format]]) as img:
            if (img.height, img.width) != tuple(shape) or img.mode != mode:
                raise CodecError(f"a {img.width}x{img.height} {img.mode} image; the task's images are "
                                 f"{shape[1]}x{shape[0]} {mode}")
            img.load()
            return np.asarray(img)
    except CodecError:
        raise
    except Image.DecompressionBombError:
        raise CodecError("an image over Pillow's pixel limit (a decompression bomb)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # not this format, truncated, corrupt
        raise CodecError(f"not a decodable {format} image ({type(exc).__name__})") from None


def decode(data: bytes) -> np.ndarray:
    """File bytes -> (H, W, 3) or (H, W) uint8, exactly as stored (no conversion)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images; ``inf`` when they are identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
