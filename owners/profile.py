"""Profiles: the cloud an owner joined, so that ``owner-agent --key K --data D`` needs nothing else.

    $OWNER_AGENT_HOME/profiles/<name>.json    server address, TLS files, plaintext flag (0600)
    $OWNER_AGENT_HOME/profiles/<name>.token   the upload token (0600), never inside the .json

The folder is 0700. ``owner-agent join SERVER --token-file F`` first asks the server for its task
with that token (so a typo or a wrong certificate is found now, not at the first upload), then
saves. Flags given to a command override its profile's fields; ``--profile NAME`` picks one of
several (``default`` otherwise).

A profile never holds ``--accept-cloud-can-decrypt``: accepting that the cloud can decrypt what is
sent is a decision about one task's settings, and the same profile later reaches a task with other
settings (the operator changes the geometry or key mode, a new run starts). Saved, the acceptance
would silently cover settings the owner never saw the verdict for; so it is a flag of each command,
and a profile file that names it is refused as malformed (``Profile`` has no such field).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from owners.errors import OwnerError
from owners.files import private_dir
from owners.keys import check_private, keyring_dir
from protocol.shards import atomic_write
from protocol.task import is_safe_name

DEFAULT_PROFILE = "default"


class ProfileError(OwnerError):
    """No such profile, or a profile file that is not ours or not private."""


@dataclass(frozen=True)
class Profile:
    server: str  # HOST:PORT of the ingest service
    ca_file: str | None = None  # absolute paths, as given to join
    client_cert: str | None = None
    client_key: str | None = None
    insecure: bool = False  # plaintext, loopback only (checked again on every connection)
    predict_server: str | None = None  # HOST:PORT of the prediction service (serve.listen), if known

    def server_for(self, service: str) -> str:
        """The address of ``service`` ("ingest" or "predict")."""
        if service == "predict":
            if not self.predict_server:
                raise ProfileError("this profile knows no prediction service: pass --server HOST:PORT, or join again "
                                   "with --predict-server HOST:PORT")
            return self.predict_server
        return self.server


def profiles_dir() -> Path:
    return keyring_dir().parent / "profiles"


def _paths(name: str) -> tuple[Path, Path]:
    if not is_safe_name(name):
        raise ProfileError(f"profile name {name!r}: use letters, digits, '.', '_' or '-'")
    folder = profiles_dir()
    return folder / f"{name}.json", folder / f"{name}.token"


def save_profile(name: str, profile: Profile, token: str) -> Path:
    """Write (or replace) profile ``name``; the token goes to its own 0600 file."""
    doc_path, token_path = _paths(name)
    private_dir(doc_path.parent)
    os.chmod(doc_path.parent, 0o700)  # our own folder: private even if it existed with other modes
    atomic_write(token_path, token.encode("utf-8"), private=True)
    atomic_write(doc_path, (json.dumps(asdict(profile), indent=1) + "\n").encode("utf-8"), private=True)
    return doc_path


def load_profile(name: str) -> tuple[Profile, str]:
    """The profile and its token; a clear error when there is none."""
    doc_path, token_path = _paths(name)
    if not doc_path.is_file() or not token_path.is_file():
        hint = "" if name == DEFAULT_PROFILE else f" --profile {name}"
        raise ProfileError(f"no server given and no profile {name!r}: run `owner-agent join SERVER --token-file F"
                           f"{hint}` once, or pass --server")
    for path in (doc_path, token_path):
        check_private(path, "profile file")
    try:
        doc = json.loads(doc_path.read_text("utf-8"))
        profile = Profile(**doc)
    except (ValueError, TypeError) as exc:
        raise ProfileError(f"profile {doc_path} is malformed ({type(exc).__name__}); run `owner-agent join` "
                           "again") from None
    return profile, token_path.read_text("utf-8").strip()


def list_profiles() -> list[str]:
    folder = profiles_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
