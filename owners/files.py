"""Folders and files at the owner that only the owner may read."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from owners.errors import OutboxError


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents readable by this user only (0700).

    A folder that already exists is left as it is: it is the owner's to set, and a path from
    anywhere else (a server's run name, say) must never get a chmod of ours.
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    if not path.is_dir():
        raise OutboxError(f"{path} exists and is not a folder")
    return path


def check_not_shared(path: Path, what: str) -> None:
    """Refuse a folder others may write to or that another user owns (e.g. one on a PATH we set)."""
    st = Path(path).stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OutboxError(f"{what} {path} is writable by other users or not yours; fix with: chmod 700 {path}")
