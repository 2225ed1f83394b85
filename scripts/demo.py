"""End-to-end demo on the sample shipped in examples/, offline, about five minutes on 2 cores.

Runs the commands a data owner and the cloud operator would run, then checks the results:
  1. owner-agent encrypt + decrypt (lossless PNG) -> bit-exact round trip, verified here
  2. owner-agent preview                          -> plain | encrypted | decrypted grid
  3. orchestrator launch (local Ray + dashboard, ingest), two hospitals sharing one key upload
     train and test splits; one also uploads its test images under a key the model never sees;
     training, the per-owner/key report, then owner-agent predict against the prediction service
Usage: python scripts/demo.py --out demo-out [--epochs 6]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def cloud_side(out: Path, epochs: int) -> None:
    """orchestrator launch + two hospitals sharing one key (the paper's setting), then predictions."""
    config = yaml.safe_load((ROOT / "deploy" / "local-cpu.yaml").read_text())
    tokens = {}
    for owner in OWNERS:  # each owner gets an upload token; the config keeps only its hash
        path = out / f"{owner}.token"
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
        tokens[owner] = path
    ingest_port, serve_port = free_port(), free_port()
    config["ingest"].update(listen=f"127.0.0.1:{ingest_port}", store=str((out / "store").resolve()),
                            owners=[{"id": o, "token_sha256": _sha(tokens[o])} for o in OWNERS])
    config["serve"]["listen"] = f"127.0.0.1:{serve_port}"
    config["training"]["epochs"] = epochs
    (out / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run("orchestrator", "check", str(out / "cluster.yaml"))

    log = open(out / "launch.log", "w")
    print(f"$ orchestrator launch {out / 'cluster.yaml'}   (log: {out / 'launch.log'})", flush=True)
    launch = subprocess.Popen([str(BIN / "orchestrator"), "launch", str(out / "cluster.yaml")], stdout=log, stderr=log)
    try:
        _wait_for(out / "launch.log", "ingest service on port", launch, 120)
        dashboard = next(l for l in (out / "launch.log").read_text().splitlines() if l.startswith("Ray dashboard:"))
        print(dashboard, flush=True)
        data = split_between_owners(out)
        homes = {o: {**os.environ, "OWNER_AGENT_HOME": str((out / f"home-{o}").resolve())} for o in OWNERS}
        server = f"127.0.0.1:{ingest_port}"

        def upload(owner: str, key: str, split: str, *extra: str) -> None:
            run("owner-agent", "--key", key, "--data", str(data[owner] / split), "--split", split, "--server", server,
                "--token-file", str(tokens[owner]), *extra, env=homes[owner])

        # hospital-a creates the shared key and hands the key file to hospital-b (out of band)
        run("owner-agent", "keygen", "shared", env=homes["hospital-a"])
        shared = out / "home-hospital-a" / "keys" / "shared.key"
        upload("hospital-a", "shared", "train")
        upload("hospital-a", "shared", "test")
        upload("hospital-b", str(shared), "test")
        # the same test images under a key the model never sees: its accuracy should be near chance
        upload("hospital-b", "private", "test", "--new-key-domain")
        upload("hospital-b", str(shared), "train")  # the last upload: training starts
        print("training (follow it in the Ray dashboard) ...", flush=True)
        _wait_for(out / "launch.log", "prediction service on port", launch, 3600)
        report = next(l for l in (out / "launch.log").read_text().splitlines() if l.startswith("report: "))
        print((Path(report.split(": ", 1)[1])).read_text())

        picks = sorted((data["hospital-a"] / "test").glob("*/*.jpg"))[::5]
        print(f"$ owner-agent predict --key shared --server 127.0.0.1:{serve_port} ... ({len(picks)} test images)")
        result = subprocess.run([str(BIN / "owner-agent"), "predict", "--key", "shared", "--server",
                                 f"127.0.0.1:{serve_port}", "--token-file", str(tokens["hospital-a"]), "--top", "1",
                                 *map(str, picks)], env=homes["hospital-a"], capture_output=True, text=True)
        right = 0
        for line in result.stdout.splitlines():
            path, answer = line.split("\t")
            truth = Path(path).parent.name
            right += answer.split()[0] == truth
            print(f"  {truth:>10} -> {answer}")
        print(f"predict: {right}/{len(picks)} right")
        refused = subprocess.run([str(BIN / "owner-agent"), "predict", "--key", "private", "--server",
                                  f"127.0.0.1:{serve_port}", "--token-file", str(tokens["hospital-b"]), str(picks[0])],
                                 env=homes["hospital-b"], capture_output=True, text=True)
        print(f"predict with a key the model never saw -> {refused.stderr.strip()}")
        print(dashboard)
    finally:
        launch.send_signal(signal.SIGINT)
        try:
            launch.wait(120)
        except subprocess.TimeoutExpired:
            launch.kill()
            raise SystemExit("demo failed: orchestrator launch did not stop on SIGINT")


def _sha(token_file: Path) -> str:
    import hashlib

    return hashlib.sha256(token_file.read_text().strip().encode()).hexdigest()


def _wait_for(log: Path, marker: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while marker not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"demo failed waiting for {marker!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", type=Path)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (about 30 s each on 2 cores)")
    args = parser.parse_args()
    out = args.out
    for sub in ("outbox-png", "decrypted", "data", "store", "home-hospital-a", "home-hospital-b"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    owner_side(out)
    cloud_side(out, args.epochs)
    print("\ndemo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
