"""The task: what every owner encrypts for and what the cloud trains on. One type, both sides.

The cloud reads it from ``cluster.yaml`` (``task:``), sends it to owners over gRPC (``pb.Task``),
owners encrypt for it, the store checks every manifest against it and training derives the
model's input shape from it. :class:`Task` validates itself on construction, so an invalid task
exists nowhere; its errors name the field (``task.block_size: ...``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.codec import CHROMA_SUBSAMPLING, CODECS, Codec

SCHEMES = ("color", "gray", "plain")  # plain: no encryption (baselines)
ENCRYPTED_SCHEMES = ("color", "gray")
DEFAULT_BLOCK = {"color": 16, "gray": 8}  # colour: one JPEG 4:2:0 MCU; gray: one 8x8 DCT block
SPLITS = ("train", "test")
KEY_MODES = ("owner", "per-image")  # owner: one key per owner, reused for every image | per-image: a fresh
# random key for every image, kept by nobody (nothing pools across images; the model must need no key)
PER_IMAGE_KEY_ID = "per-image"  # the manifest key id of per-image-key data: no key of anyone's (never 16 hex digits)
MAX_IMAGE_SIZE = 1024  # pixels: a task's images are encrypted and held in memory in batches at the owner
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # run names and owner ids: safe in any path


def is_safe_name(name: object) -> bool:
    """A run name or owner id: letters, digits, '.', '_', '-'; it never leaves the folder it names."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def is_safe_component(name: object) -> bool:
    """A class name: any text that is one path component (it names a folder at the owner)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and len(name.encode("utf-8")) <= 255
            and not any(c in name for c in "/\\\0") and name.isprintable())


class TaskError(ValueError):
    """A task field is out of range or inconsistent; ``field`` names it (e.g. ``block_size``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"task.{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Task:
    classes: tuple[str, ...]  # label id = position in this tuple
    image_size: int = 32  # pixels, square
    block_size: int = 16  # EtC block in pixels (colour 16, gray 8); unused for plain
    scheme: str = "color"  # color | gray | plain
    format: str = "jpeg"  # stored codec: jpeg (lossy, small) | png (lossless)
    quality: int = 85  # JPEG quality 1-100
    chroma: str = "420"  # JPEG chroma subsampling of colour images: 420 | 444
    key_mode: str = "owner"  # owner | per-image (KEY_MODES); only for encrypted schemes

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise TaskError("classes", "need distinct class names")
        bad = [c for c in self.classes if not is_safe_component(c)]
        if bad:
            raise TaskError("classes", f"{bad[0]!r} is not a folder name (no '/', '\\', control characters, "
                                       "'.' or '..')")
        if self.scheme not in SCHEMES:
            raise TaskError("scheme", f"{self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.format not in CODECS:
            raise TaskError("format", f"{self.format!r} is not one of {', '.join(CODECS)}")
        if self.chroma not in CHROMA_SUBSAMPLING:
            raise TaskError("chroma", f"{self.chroma!r} is not one of {', '.join(CHROMA_SUBSAMPLING)}")
        if self.key_mode not in KEY_MODES:
            raise TaskError("key_mode", f"{self.key_mode!r} is not one of {', '.join(KEY_MODES)}")
        if self.key_mode != "owner" and not self.encrypted:
            raise TaskError("key_mode", f"{self.key_mode!r} needs an encrypted task.scheme (color or gray)")
        if not 1 <= self.quality <= 100:
            raise TaskError("quality", f"{self.quality} is not in 1..100")
        if not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise TaskError("image_size", f"{self.image_size} is not in 1..{MAX_IMAGE_SIZE} pixels")
        if self.encrypted and (self.block_size < 1 or self.image_size % self.block_size):
            raise TaskError("image_size", f"{self.image_size} is not a multiple of task.block_size {self.block_size}")

    @property
    def encrypted(self) -> bool:
        return self.scheme != "plain"

    @property
    def per_image_keys(self) -> bool:
        return self.key_mode == "per-image"

    @property
    def codec(self) -> Codec:
        return Codec(self.format, self.quality, self.chroma)

    @property
    def model_input(self) -> ModelInput:
        return ModelInput(self.image_size, self.block_size if self.encrypted else None, self.scheme)

    def to_pb(self, pb_module, run_name: str, owner_id: str = ""):
        """The gRPC message (``pb_module`` is ``protocol.proto.ingest_pb2``)."""
        return pb_module.Task(run_name=run_name, classes=list(self.classes), image_size=self.image_size,
                              block_size=self.block_size, scheme=self.scheme, format=self.format,
                              quality=self.quality, chroma=self.chroma, owner_id=owner_id,
                              key_mode=self.key_mode)

    @classmethod
    def from_pb(cls, message) -> Task:
        """From a ``pb.Task`` a server sent: validated like any other task (raises TaskError)."""
        return cls(tuple(message.classes), message.image_size, message.block_size, message.scheme, message.format,
                   message.quality, message.chroma, message.key_mode or "owner")  # "": a server before key_mode


@dataclass(frozen=True)
class ModelInput:
    """What a network sees: colour and plain images (3, S, S); gray EtC's stacked YCbCr (1, S, 3S)."""

    image_size: int  # pixels
    block_size: int | None  # EtC block in pixels; None for plain images (no block grid to respect)
    scheme: str

    @property
    def in_chans(self) -> int:
        return 1 if self.scheme == "gray" else 3

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of one input image."""
        return (self.image_size, 3 * self.image_size) if self.scheme == "gray" else (self.image_size, self.image_size)
