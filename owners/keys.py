"""Owner keys: the keyring, key files, passphrase-derived keys, key ids, and the key stream.

A key is 256 random bits. It lives in a file of its own (mode 0600) in the owner's keyring,
``$OWNER_AGENT_HOME/keys/<name>.key`` (default ``~/.owner-agent``). Commands take ``--key NAME``:
a name in the keyring or the path of a key file, never the secret itself (argv is visible to
every local user).

Everything derived from a key (the block schedule of every geometry) comes from
:class:`KeyStream`, an HMAC-SHA256 counter stream. It depends only on the secret, the label and
the counter, so the schedule is identical on every machine and every Python or numpy version.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from owners.errors import OwnerError

SECRET_BYTES = 32  # 256-bit keys (``docs/design.md``, key schedule)
KEY_FILE_FORMAT = "etc-owner-key"
KEY_FILE_VERSION = 1
KEY_ID_LABEL = b"etc-owner-agent/key-id/v1"
KEY_ID_HEX_CHARS = 16  # 64 bits: enough to group uploads by key, says nothing about the secret
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# scrypt cost for passphrase-derived keys (``docs/design.md``, key schedule): 128 MiB of memory per derivation.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 256 * 1024 * 1024


class KeyringError(OwnerError):
    """A key cannot be found, read or trusted; the message says which file and why."""


@dataclass(frozen=True)
class OwnerKey:
    """A loaded key. ``secret`` is excluded from repr so it never lands in a log by accident."""

    name: str
    secret: bytes = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.secret) != SECRET_BYTES:
            raise KeyringError(f"key {self.name!r}: secret must be {SECRET_BYTES} bytes")

    @property
    def key_id(self) -> str:
        return key_id_of(self.secret)

    def stream(self, label: str) -> KeyStream:
        return KeyStream(self.secret, label)


def key_id_of(secret: bytes) -> str:
    """Public fingerprint of a secret: HMAC with a fixed label, truncated."""
    return hmac.new(secret, KEY_ID_LABEL, hashlib.sha256).hexdigest()[:KEY_ID_HEX_CHARS]


class KeyStream:
    """Deterministic pseudo-random integers from a secret and a label.

    Block ``c`` of the stream is HMAC-SHA256(secret, label || c as 8 big-endian bytes); the
    stream is read as big-endian 32-bit words. ``below(n)`` is unbiased (rejection sampling),
    ``permutation(n)`` is a Fisher-Yates shuffle driven by ``below``.
    """

    def __init__(self, secret: bytes, label: str) -> None:
        self._secret = secret
        self._label = label.encode("utf-8")
        self._counter = 0
        self._words: list[int] = []

    def _refill(self) -> None:
        block = hmac.new(
            self._secret, self._label + self._counter.to_bytes(8, "big"), hashlib.sha256
        ).digest()
        self._counter += 1
        # Reversed so that pop() hands the words out in stream order.
        self._words = [int.from_bytes(block[i : i + 4], "big") for i in range(28, -1, -4)]

    def word(self) -> int:
        if not self._words:
            self._refill()
        return self._words.pop()

    def below(self, n: int) -> int:
        """Uniform integer in [0, n)."""
        if not 0 < n <= 2**32:
            raise ValueError(f"n out of range: {n}")
        limit = (2**32 // n) * n
        while True:
            w = self.word()
            if w < limit:
                return w % n

    def permutation(self, n: int) -> list[int]:
        items = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
        return items


# --------------------------------------------------------------------------- keyring


def keyring_dir() -> Path:
    home = os.environ.get("OWNER_AGENT_HOME")
    return (Path(home) if home else Path.home() / ".owner-agent") / "keys"


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise KeyringError(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith(".key") or spec.startswith(".")


def check_private(path: Path, what: str = "key file") -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyringError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"refusing to use it. Fix with: chmod 600 {path}"
        )


def read_passphrase_file(path: Path) -> str:
    """The first line of a passphrase file, which must be private like a key file."""
    path = Path(path)
    if not path.is_file():
        raise KeyringError(f"passphrase file {path} does not exist")
    check_private(path, "passphrase file")
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError:
        raise KeyringError(f"passphrase file {path} is not UTF-8 text") from None
    return text.splitlines()[0] if text else ""


def read_key_file(path: Path, name: str | None = None) -> OwnerKey:
    path = Path(path)
    if not path.is_file():
        raise KeyringError(f"key file {path} does not exist")
    check_private(path)
    try:
        doc = json.loads(path.read_text("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("format") != KEY_FILE_FORMAT or doc.get("version") != KEY_FILE_VERSION:
            raise ValueError("not an owner-agent key file (format/version)")
        secret = bytes.fromhex(doc["secret"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        # The exception text could quote file content: do not include it.
        raise KeyringError(f"key file {path} is malformed ({type(exc).__name__})") from None
    key = OwnerKey(name=name or path.stem, secret=secret, path=path)
    recorded = doc.get("key_id")
    if recorded is not None and recorded != key.key_id:
        raise KeyringError(f"key file {path} is corrupted: its recorded key id does not match")
    return key


def write_key_file(path: Path, secret: bytes, origin: str) -> None:
    """Create a key file atomically with mode 0600; never overwrite an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    doc = {
        "format": KEY_FILE_FORMAT,
        "version": KEY_FILE_VERSION,
        "key_id": key_id_of(secret),
        "origin": origin,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "secret": secret.hex(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if the key appeared meanwhile: never replace a key
    except FileExistsError:
        raise KeyringError(f"key {path} already exists; refusing to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)


def announce_new_key(key: OwnerKey, out=None) -> None:
    bar = "!" * 78
    print(
        f"{bar}\n"
        f"NEW KEY CREATED: name {key.name!r}, key id {key.key_id}\n"
        f"  stored in {key.path}\n"
        f"  BACK UP THIS FILE NOW and keep it secret. Without it, images encrypted with it\n"
        f"  can never be decrypted, and the model trained on them cannot classify new images.\n"
        f"{bar}",
        file=out or sys.stderr,
        flush=True,
    )


def create_key(name: str, secret: bytes | None = None, origin: str = "random") -> OwnerKey:
    _check_name(name)
    path = keyring_dir() / f"{name}.key"
    secret = secrets.token_bytes(SECRET_BYTES) if secret is None else secret
    write_key_file(path, secret, origin)
    return OwnerKey(name=name, secret=secret, path=path)


def resolve_key(spec: str, create: bool = True) -> tuple[OwnerKey, bool]:
    """``--key`` semantics: a key file path, or a name in the keyring (created on first use).

    Returns the key and whether it was just created (the caller announces it loudly).
    """
    if _looks_like_path(spec):
        return read_key_file(Path(spec)), False
    _check_name(spec)
    path = keyring_dir() / f"{spec}.key"
    if path.exists():
        return read_key_file(path, name=spec), False
    if not create:
        raise KeyringError(f"no key named {spec!r} in the keyring {keyring_dir()}")
    return create_key(spec), True


def list_keys() -> list[OwnerKey]:
    folder = keyring_dir()
    if not folder.is_dir():
        return []
    return [read_key_file(p, name=p.stem) for p in sorted(folder.glob("*.key"))]


def derive_from_passphrase(passphrase: str, salt: str) -> bytes:
    """scrypt (N=2^17, r=8, p=1): the same passphrase and salt give the same key anywhere.

    Both are Unicode-normalised to NFC first: the same words typed on keyboards (or systems) that
    compose accents differently (NFC vs NFD) give the same key.
    """
    passphrase, salt = unicodedata.normalize("NFC", passphrase), unicodedata.normalize("NFC", salt)
    if len(passphrase) < 12:
        raise KeyringError("passphrase too short: use at least 12 characters")
    return hashlib.scrypt(
        passphrase.encode("utf-8"),
        salt=b"etc-owner-agent/passphrase/v1|" + salt.encode("utf-8"),
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=SCRYPT_MAXMEM,
        dklen=SECRET_BYTES,
    )
