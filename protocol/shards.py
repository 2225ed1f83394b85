"""The upload format: WebDataset tar shards plus ``manifest.json``, and the image codec.

A shard holds ``<id>.jpg`` (or ``.png``) and ``<id>.cls`` (the integer label, ASCII) per sample,
where ``<id>`` is the sha256 of the encoded image (first 32 hex digits). Tar headers carry no
time, user or file name of the owner, so the same inputs give byte-identical shards.

The manifest records what a reader needs and nothing secret: key id (absent for plain data),
scheme, geometry, codec, classes, and per-shard sha256, size and counts. Nothing here touches
key material: both sides use this module (the image codec is ``protocol/codec.py``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protocol.codec import CodecError, check_encoded
from protocol.task import PER_IMAGE_KEY_ID, SCHEMES, SPLITS, is_safe_component

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "etc-webdataset"
MANIFEST_VERSION = 1
SAMPLE_ID_HEX_CHARS = 32


MAX_MANIFEST_BYTES = 16 << 20  # about 80,000 shards; far above any real dataset's manifest
MAX_COUNT = 1 << 40  # bytes or images of one shard or dataset: anything larger is a lie
MAX_LIST = 100_000  # classes or shards in one manifest


class ManifestError(ValueError):
    """A manifest or shard folder is malformed or does not match its files; the message names it."""


# The JSON type of every manifest field (and of every shard entry's): checked before anything reads a
# value, so that no input, however malformed, reaches code that assumes a type.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "key_id": (str, type(None)), "scheme": (str,), "image_size": (int,), "block_size": (int, type(None)),
    "codec": (dict,), "classes": (list,), "split": (str,), "count": (int,), "class_counts": (list,),
    "shards": (list,), "producer": (str,), "format": (str,), "version": (int,),
}
_SHARD_TYPES: dict[str, tuple[type, ...]] = {"name": (str,), "sha256": (str,), "bytes": (int,), "count": (int,)}
_CODEC_TYPES: dict[str, tuple[type, ...]] = {"format": (str,), "quality": (int,), "chroma": (str,)}


def _check_fields(obj: object, types: dict[str, tuple[type, ...]], where: str, required: bool) -> None:
    """``obj`` is a JSON object with only known fields (all of them when ``required``), each of its
    type; integers are not booleans and lie in [0, MAX_COUNT]."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(map(str, set(obj) - set(types)))
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)[:200]}")
    missing = sorted(set(types) - set(obj)) if required else []
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    for name, value in obj.items():
        allowed = types[name]
        if isinstance(value, bool) or not isinstance(value, allowed):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ManifestError(f"{where}: {name}: expected {expected}, got {type(value).__name__}")
        _check_int(value, f"{where}: {name}")


def _check_int(value: object, where: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_COUNT:
        raise ManifestError(f"{where}: {value if abs(value) < 10**20 else 'a huge number'} is outside [0, {MAX_COUNT}]")


def _check_list(items: list, item_type: type, where: str) -> None:
    if len(items) > MAX_LIST:
        raise ManifestError(f"{where}: {len(items)} entries, more than {MAX_LIST}")
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, item_type):
            raise ManifestError(f"{where}[{i}]: expected {item_type.__name__}, got {type(item).__name__}")
        _check_int(item, f"{where}[{i}]")


def _check_document(doc: object, where: str) -> None:
    """The manifest's JSON shape, field by field, before any value is used."""
    _check_fields(doc, _FIELD_TYPES, where, required=False)
    _check_fields(doc.get("codec", {}), _CODEC_TYPES, f"{where}: codec", required=False)
    _check_list(doc.get("classes", []), str, f"{where}: classes")
    _check_list(doc.get("class_counts", []), int, f"{where}: class_counts")
    _check_list(doc.get("shards", []), dict, f"{where}: shards")
    for i, shard in enumerate(doc.get("shards", [])):
        _check_fields(shard, _SHARD_TYPES, f"{where}: shards[{i}]", required=True)


def sample_id(encoded: bytes) -> str:
    return hashlib.sha256(encoded).hexdigest()[:SAMPLE_ID_HEX_CHARS]


@dataclass
class ShardInfo:
    name: str
    sha256: str
    bytes: int
    count: int


@dataclass
class Manifest:
    key_id: str | None  # public fingerprint of the owner's key; None for --plain
    scheme: str  # "color", "gray" or "plain"
    image_size: int  # pixels, square images
    block_size: int | None  # pixels; None for plain
    codec: dict  # Codec fields
    classes: list[str]
    split: str  # "train" or "test"
    count: int = 0
    class_counts: list[int] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)
    producer: str = "owner-agent"
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path} not found: not a shard folder written by owner-agent encrypt")
        return cls.parse(path.read_bytes(), str(path))

    @classmethod
    def parse(cls, data: bytes, where: str = MANIFEST_NAME) -> Manifest:
        """Strict parse: a clear ValueError naming ``where`` and the field for anything off.

        The cloud parses owners' manifests with this too, so it checks what it trusts: types,
        shard names, hashes and counts that add up.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where}: {len(data)} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{where} is not valid JSON: {exc}") from None
        except RecursionError:  # "[[[[...": nesting deeper than the parser's stack
            raise ManifestError(f"{where}: JSON nested too deeply") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or doc.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{where}: unsupported manifest format/version")
        _check_document(doc, where)
        try:
            shards = [ShardInfo(**s) for s in doc.get("shards", [])]
            manifest = cls(**{**doc, "shards": shards})
        except TypeError as exc:  # a required field is missing
            raise ManifestError(f"{where}: malformed ({exc})") from None
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        def need(ok: bool, field_name: str, why: str) -> None:
            if not ok:
                raise ManifestError(f"{where}: {field_name}: {why}")

        need(self.split in SPLITS, "split", f"{self.split!r} is not train or test")
        need(self.scheme in SCHEMES, "scheme", f"{self.scheme!r} is unknown")
        need((self.key_id is None) == (self.scheme == "plain"), "key_id", "present exactly when encrypted")
        need(self.key_id in (None, PER_IMAGE_KEY_ID) or re.fullmatch(r"[0-9a-f]{16}", str(self.key_id)) is not None,
             "key_id", f"expected 16 hex digits (or {PER_IMAGE_KEY_ID!r}: a fresh key per image)")
        need(isinstance(self.classes, list) and all(is_safe_component(c) for c in self.classes), "classes",
             "expected a list of names that are folder names (no '/', '..' or control characters)")
        need(isinstance(self.class_counts, list) and len(self.class_counts) == len(self.classes),
             "class_counts", "one count per class")
        need(sum(self.class_counts) == self.count == sum(s.count for s in self.shards), "count",
             "does not add up over classes and shards")
        names = set()
        for i, shard in enumerate(self.shards):
            need(re.fullmatch(r"shard-\d{5}\.tar", str(shard.name)) is not None, f"shards[{i}].name",
                 f"{shard.name!r} is not shard-NNNNN.tar")
            need(re.fullmatch(r"[0-9a-f]{64}", str(shard.sha256)) is not None, f"shards[{i}].sha256",
                 "expected 64 hex digits")
            need(isinstance(shard.bytes, int) and shard.bytes > 0, f"shards[{i}].bytes", "must be positive")
            need(isinstance(shard.count, int) and shard.count > 0, f"shards[{i}].count", "must be positive")
            need(shard.name not in names, f"shards[{i}].name", "duplicate")
            names.add(shard.name)

    def write(self, folder: Path) -> None:
        atomic_write(Path(folder) / MANIFEST_NAME, self.to_json().encode("utf-8"))


def atomic_write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all; ``private``: mode 0600 from the start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    if private:
        os.fchmod(fd, 0o600)  # an existing temp file keeps its mode otherwise
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples into ``shard-NNNNN.tar`` files of at most ``max_count`` samples each."""

    def __init__(self, folder: Path, suffix: str, max_count: int) -> None:
        self.folder = Path(folder)
        self.suffix = suffix
        self.max_count = max_count
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._count = 0

    def add(self, sid: str, encoded: bytes, label: int) -> None:
        if self._tar is None:
            self._path = self.folder / f"shard-{len(self.shards):05d}.tar"
            partial = self._path.with_suffix(".tar.partial")
            self._tar = tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - spans add() calls; _finish() closes it
            self._count = 0
        cls = str(label).encode("ascii")
        self._tar.addfile(_member(f"{sid}.{self.suffix}", len(encoded)), io.BytesIO(encoded))
        self._tar.addfile(_member(f"{sid}.cls", len(cls)), io.BytesIO(cls))
        self._count += 1
        if self._count >= self.max_count:
            self._finish()

    def _finish(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        partial = self._path.with_suffix(".tar.partial")
        digest, size = file_sha256(partial)
        os.replace(partial, self._path)
        self.shards.append(ShardInfo(self._path.name, digest, size, self._count))
        self._tar = None

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


MEMBER = re.compile(rf"^([0-9a-f]{{{SAMPLE_ID_HEX_CHARS}}})\.(jpg|png|cls)$")  # what ShardWriter writes


def iter_samples(path: Path) -> Iterator[tuple[str, bytes, int]]:
    """Yield (id, encoded image bytes, label) from one shard, in file order.

    Member names are exactly what :class:`ShardWriter` writes (``<32 hex>.jpg|png|cls``): nothing
    else is read, so no name from a shard can ever reach a path.
    """
    with tarfile.open(path, "r") as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            match = MEMBER.fullmatch(member.name)
            if not member.isfile() or match is None:
                raise ManifestError(f"{path}: unexpected member {member.name[:80]!r} (not <sample id>.jpg|png|cls)")
            stem, ext = match.groups()
            f = tar.extractfile(member)
            assert f is not None
            pending.setdefault(stem, {})[ext] = f.read()
            entry = pending[stem]
            if "cls" in entry and len(entry) == 2:
                image_ext = next(k for k in entry if k != "cls")
                if not entry["cls"].isdigit() or len(entry["cls"]) > 6:
                    raise ManifestError(f"{path}: {stem}.cls is not a label number")
                yield stem, entry[image_ext], int(entry["cls"])
                del pending[stem]
        if pending:
            raise ManifestError(f"{path}: incomplete samples {sorted(pending)[:3]}")


def inspect_shard(path: Path, task, expected_images: int) -> None:
    """Everything training will read from one shard, checked before anyone trains on it: member
    names, labels within the task's classes, every image decodable in the task's codec, size and
    mode, and as many samples as the manifest says. Raises ManifestError naming the problem."""
    model_input = task.model_input
    count = 0
    try:
        for sid, data, label in iter_samples(path):
            if label >= len(task.classes):
                raise ManifestError(f"sample {sid}: label {label}, the task has {len(task.classes)} classes")
            try:
                check_encoded(data, task.format, model_input.shape, model_input.in_chans)
            except CodecError as exc:
                raise ManifestError(f"sample {sid}: {exc}") from None
            count += 1
    except tarfile.TarError as exc:
        raise ManifestError(f"not a tar archive ({exc})") from None
    if count != expected_images:
        raise ManifestError(f"{count} samples, the manifest says {expected_images}")


def verify_shards(folder: Path, manifest: Manifest) -> None:
    """Check every shard's sha256 and size against the manifest; raise naming the bad file."""
    for shard in manifest.shards:
        path = Path(folder) / shard.name
        if not path.is_file():
            raise ManifestError(f"shard {path} listed in the manifest is missing")
        digest, size = file_sha256(path)
        if (digest, size) != (shard.sha256, shard.bytes):
            raise ManifestError(f"shard {path} does not match its manifest entry (corrupted or modified)")
