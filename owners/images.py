"""Image preparation at the owner: scan an image folder, load any sane image as RGB of the task size.

``DIR/<class>/*`` is the layout. Each file is opened with Pillow under an allow-list of formats,
EXIF orientation applied, converted to 8-bit RGB (L, P, RGBA, CMYK and 16-bit included), resized
so its shorter side is the task size and centre-cropped to a square. A file that cannot be used is
never fatal on its own: it raises :class:`BadImage` with a reason the caller records in the run
report. Pillow's decompression-bomb limit stays on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from owners.errors import OwnerError

# Formats we decode. Everything else (SVG, PDF, PSD, EPS, ...) is refused: a smaller attack
# surface, and no format whose decoder shells out to another program.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
ALLOWED_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as most viewers show them
EXIF_ORIENTATION = 0x0112  # EXIF tag; values 2..8 mean the stored pixels must be flipped/rotated


class DataFolderError(OwnerError):
    """The data folder is missing or not laid out as DIR/<class>/<image>."""


class BadImage(OwnerError):
    """This file cannot be used; ``str(exc)`` is the reason shown in the report."""


@dataclass(frozen=True)
class SourceImage:
    path: Path  # absolute or as given; stays on the owner's machine
    relpath: str  # relative to the data root, for reports and the local index
    label: int  # index in the task's class list


@dataclass(frozen=True)
class Scan:
    images: list[SourceImage]
    skipped: list[tuple[str, str]]  # (relpath, reason) of files refused at scan time
    classes: tuple[str, ...]


def scan_image_folder(root: Path, classes: tuple[str, ...] | None = None) -> Scan:
    """List ``root/<class>/**`` in a stable order.

    With ``classes`` (the task's list) every class folder must be one of them, else
    ``DataFolderError`` naming the folder; without it the sorted folder names are the classes.
    Hidden files and folders are ignored; files without an allowed suffix are reported.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFolderError(f"data folder {root} does not exist or is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not folders:
        raise DataFolderError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    if classes is None:
        classes = tuple(p.name for p in folders)
    else:
        unknown = [p.name for p in folders if p.name not in classes]
        if unknown:
            raise DataFolderError(
                f"class folder(s) {', '.join(unknown)} in {root} are not in the task's classes "
                f"({', '.join(classes)})"
            )
    label_of = {name: i for i, name in enumerate(classes)}
    images: list[SourceImage] = []
    skipped = [(name, "file outside any class folder") for name in loose]
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            if path.suffix.lower() not in ALLOWED_SUFFIXES:
                skipped.append((str(rel), f"suffix {path.suffix or '(none)'} is not an allowed image type"))
                continue
            images.append(SourceImage(path=path, relpath=str(rel), label=label_of[folder.name]))
    return Scan(images=images, skipped=skipped, classes=tuple(classes))


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB; returns the image and a note when a non-trivial conversion happened."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grey: Pillow's convert() would clip at 255; scale the full range instead.
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), f"{mode} (16-bit) scaled to 8-bit RGB"
    if mode == "F":
        arr = np.asarray(img)
        lo, hi = float(arr.min()), float(arr.max())
        grey = np.zeros(arr.shape, np.uint8) if hi <= lo else np.rint((arr - lo) * 255 / (hi - lo)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "float image scaled to 8-bit RGB"
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} with alpha composited on white"
    if mode == "CMYK":
        return img.convert("RGB"), "CMYK converted to RGB"
    return img.convert("RGB"), None if mode in ("L", "P", "1") else f"{mode} converted to RGB"


def load_rgb(path: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """Load one image as a (size, size, 3) uint8 array; raise :class:`BadImage` with a reason.

    Returns the array and notes about conversions (EXIF rotation, mode changes).
    """
    notes: list[str] = []
    try:
        if Path(path).stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with Image.open(path) as img:
            # Pillow's decompression-bomb limit, enforced here rather than through its warning:
            # warning filters are process-wide and this runs in several threads at once.
            if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise BadImage(f"decompression bomb refused: {img.width}x{img.height} pixels is more "
                               f"than the limit of {Image.MAX_IMAGE_PIXELS}")
            if img.format not in ALLOWED_FORMATS:
                raise BadImage(f"format {img.format} is not allowed ({', '.join(ALLOWED_FORMATS)})")
            if getattr(img, "n_frames", 1) > 1:
                notes.append("multi-frame image: first frame used")
            if img.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the image is much larger than needed.
                img.draft("RGB" if img.mode != "CMYK" else None, (size, size))
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
                notes.append("EXIF orientation applied")
            oriented = ImageOps.exif_transpose(img)
            rgb, note = _to_rgb(oriented)
            if note:
                notes.append(note)
            return _fit_square(rgb, size), notes
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb refused: {exc}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # Truncated data, broken headers, unsupported compression modes, ...
        raise BadImage(f"cannot decode: {type(exc).__name__}: {exc}") from None


def _fit_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then centre-crop."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise BadImage(f"unexpected decoded shape {arr.shape}")
    return arr
