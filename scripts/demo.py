"""End-to-end demo on the sample shipped in examples/, offline, about a minute on 2 cores.

Runs the commands a data owner and the cloud operator would run, then checks the results:
  1. owner-agent encrypt + decrypt (lossless PNG) -> bit-exact round trip, verified here
  2. owner-agent preview                          -> plain | encrypted | decrypted grid
  3. orchestrator ingest (cloud) + two owners, each with its own key, uploading train and test
     splits with owner-agent                      -> the store's catalog, checked against the outboxes
Usage: python scripts/demo.py --out demo-out   (make demo sets OWNER_AGENT_HOME under --out)
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample"
BIN = Path(sys.executable).parent
OWNERS = ("hospital-a", "hospital-b")


def run(*args: str, env: dict | None = None) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([str(BIN / args[0]), *args[1:]], check=True, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def owner_side(out: Path) -> None:
    train = SAMPLE / "train"
    run("owner-agent", "encrypt", "--key", "demo-owner", "--data", str(train), "--out", str(out / "outbox-png"),
        "--format", "png", "--overwrite")
    run("owner-agent", "decrypt", "--key", "demo-owner", "--shards", str(out / "outbox-png"), "--out", str(out / "decrypted"))
    run("owner-agent", "preview", "--key", "demo-owner", "--data", str(train), "--out", str(out / "preview.png"))
    from owners.images import load_rgb  # the demo's own check, not part of the flow

    classes = json.loads((out / "outbox-png" / "manifest.json").read_text())["classes"]
    index = [json.loads(line) for line in (out / "outbox-png" / "local" / "index.jsonl").read_text().splitlines()]
    exact = sum(np.array_equal(np.asarray(Image.open(out / "decrypted" / classes[e["label"]] / f"{e['id']}.png")),
                               load_rgb(train / e["file"], 32)[0]) for e in index)
    print(f"round trip: {exact}/{len(index)} images decrypted bit-exactly; preview in {out / 'preview.png'}")
    if exact != len(index):
        raise SystemExit("demo failed: decryption is not exact")


def split_between_owners(out: Path) -> dict[str, Path]:
    """Give each owner half of every class of the sample (symlinks), train and test."""
    folders = {}
    for i, owner in enumerate(OWNERS):
        for split in ("train", "test"):
            for cls in sorted(p for p in (SAMPLE / split).iterdir() if p.is_dir()):
                target = out / "data" / owner / split / cls.name
                target.mkdir(parents=True, exist_ok=True)
                for f in sorted(cls.iterdir())[i :: len(OWNERS)]:
                    (target / f.name).symlink_to(f)
        folders[owner] = out / "data" / owner
    return folders


def cloud_side(out: Path) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "local-cpu.yaml").read_text())
    tokens = {}
    for owner in OWNERS:  # each owner gets an upload token; the config keeps only its hash
        token = secrets.token_urlsafe(32)
        path = out / f"{owner}.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        tokens[owner] = path
    port = free_port()
    config["ingest"].update(listen=f"127.0.0.1:{port}", store=str((out / "store").resolve()),
                            owners=[{"id": o, "token_sha256": _sha(tokens[o])} for o in OWNERS])
    (out / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run("orchestrator", "check", str(out / "cluster.yaml"))
    log = open(out / "ingest.log", "w")
    server = subprocess.Popen([str(BIN / "orchestrator"), "ingest", str(out / "cluster.yaml")], stdout=log, stderr=log)
    try:
        _wait_for(out / "ingest.log", "Ctrl-C stops", server)
        for owner, data in split_between_owners(out).items():
            env = {**os.environ, "OWNER_AGENT_HOME": str((out / f"home-{owner}").resolve())}
            for split in ("train", "test"):
                run("owner-agent", "--key", f"{owner}-key", "--data", str(data / split), "--split", split,
                    "--server", f"127.0.0.1:{port}", "--token-file", str(tokens[owner]), env=env)
    finally:
        server.terminate()
        server.wait(30)
    db = sqlite3.connect(out / "store" / config["name"] / "catalog.sqlite")
    rows = db.execute("SELECT owner, split, key_id, images, committed FROM datasets ORDER BY owner, split").fetchall()
    print("\nstore catalog (owner, split, key id, images, committed):")
    for row in rows:
        print("  ", *row)
    if len(rows) != 4 or not all(r[4] for r in rows) or len({r[2] for r in rows}) != 2:
        raise SystemExit("demo failed: expected 4 committed datasets under 2 key ids")


def _sha(token_file: Path) -> str:
    import hashlib

    return hashlib.sha256(token_file.read_text().strip().encode()).hexdigest()


def _wait_for(log: Path, marker: str, proc: subprocess.Popen) -> None:
    import time

    deadline = time.monotonic() + 60
    while marker not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"demo failed: the ingest service did not start:\n{log.read_text()}")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", type=Path)
    out = parser.parse_args().out
    for sub in ("outbox-png", "decrypted", "data", "store", "home-hospital-a", "home-hospital-b"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    owner_side(out)
    cloud_side(out)
    print("\ndemo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
