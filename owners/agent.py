"""The owner agent's main job: fetch the task, prepare an encrypted outbox, upload it, resumably.

    owner-agent --key NAME --data DIR --server HOST:PORT --token-file F [--split train|test]

Rerunning the same command after any crash continues: the outbox is reused when the input files,
the task and the key are unchanged (checked by a fingerprint kept in ``local/source.json``), and
the upload resumes from what the server holds.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

from owners.encrypt import LOCAL_DIR, EncryptSettings, encrypt_folder, key_for_task, upload_key_id
from owners.files import private_dir
from owners.images import scan_image_folder
from owners.keys import OwnerKey, keyring_dir
from owners.upload import Connection, IngestClient, upload_outbox
from protocol.shards import MANIFEST_NAME, atomic_write


def default_outbox(server: str, run_name: str, owner_id: str, split: str, key_id: str | None) -> Path:
    safe_server = server.replace(":", "_").replace("/", "_")
    return keyring_dir().parent / "outbox" / safe_server / run_name / owner_id / f"{split}-{key_id or 'plain'}"


def source_fingerprint(data: Path, settings: EncryptSettings, key_id: str | None) -> str:
    """Changes when an input file, the task's settings or the key changes."""
    h = hashlib.sha256()
    h.update(json.dumps({"settings": asdict(settings), "key_id": key_id, "data": str(Path(data).resolve())},
                        sort_keys=True).encode())
    for item in scan_image_folder(data, settings.task.classes if settings.task else None).images:
        st = item.path.stat()
        h.update(f"{item.relpath}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def encrypt_unless_current(data: Path, outbox: Path, key: OwnerKey | None, settings: EncryptSettings,
                           progress: bool | None, log=print) -> None:
    """Encrypt ``data`` into ``outbox``, unless the outbox already holds exactly that (same files,
    task and key): a rerun after a crash goes straight on to the upload."""
    fingerprint = source_fingerprint(data, settings, None if key is None else key.key_id)
    marker = outbox / LOCAL_DIR / "source.json"
    if ((outbox / MANIFEST_NAME).exists() and marker.exists()
            and json.loads(marker.read_text()).get("fingerprint") == fingerprint):
        log(f"outbox {outbox} is up to date; not encrypting again")
        return
    summary = encrypt_folder(data, outbox, key, settings, overwrite=True, progress=progress)
    atomic_write(marker, json.dumps({"fingerprint": fingerprint}).encode())
    log(summary.line())


def run_agent(key: OwnerKey | None, data: Path, conn: Connection, split: str, outbox: Path | None = None,
              new_key_domain: bool = False, progress: bool | None = None, shard_images: int = 10_000,
              accept_cloud_can_decrypt: bool = False, plain_ok: bool = True) -> dict:
    """Fetch the task, encrypt ``data`` for it, upload and commit. Returns a summary dict.

    The task's privacy verdict is shown before the outbox is made; ``broken`` is refused (CloudCanDecrypt,
    nothing written or sent) unless ``accept_cloud_can_decrypt``."""

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    client = IngestClient(conn, log)
    try:
        offer = client.get_task()
        task = offer.task
        key = key_for_task(task, key, plain_ok, "the server's task", log)  # none for per-image keys
        offer.checked_privacy(accept_cloud_can_decrypt, log)
        settings = EncryptSettings(task=task, split=split, shard_images=shard_images)
        log(f"{offer.describe()}, {task.format}")
        outbox = outbox or default_outbox(conn.server, offer.run_name, offer.owner_id, split, upload_key_id(task, key))
        private_dir(outbox)
        encrypt_unless_current(data, outbox, key, settings, progress, log)
        state = upload_outbox(outbox, client, new_key_domain, progress)
    finally:
        client.close()
    summary = {"dataset_id": state.dataset_id, "owner": state.owner_id, "split": state.split,
               "key_id": state.key_id or None, "images": state.images, "shards": len(state.shards),
               "committed": state.committed, "outbox": str(outbox)}
    log(f"uploaded and committed: {state.images} images in {len(state.shards)} shard(s), "
        f"{split} split, dataset {state.dataset_id[:12]}")
    return summary
