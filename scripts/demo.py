"""End-to-end demo on the sample shipped in examples/, offline, a few seconds on 2 cores.

Runs the commands a data owner would run, then checks the results:
  1. owner-agent encrypt   (colour EtC, JPEG q85)  -> an outbox ready for upload
  2. owner-agent encrypt   (lossless PNG) + decrypt -> bit-exact round trip, verified here
  3. owner-agent preview   -> plain | encrypted | decrypted grid
  4. orchestrator check    -> the cloud config the owners' task comes from
Usage: python scripts/demo.py --out demo-out   (make demo sets OWNER_AGENT_HOME under --out)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample" / "train"
BIN = Path(sys.executable).parent


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([str(BIN / args[0]), *args[1:]], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", type=Path)
    out = parser.parse_args().out
    for sub in ("outbox", "outbox-png", "decrypted"):
        shutil.rmtree(out / sub, ignore_errors=True)

    run("owner-agent", "encrypt", "--key", "demo-owner", "--data", str(SAMPLE), "--out", str(out / "outbox"))
    run("owner-agent", "encrypt", "--key", "demo-owner", "--data", str(SAMPLE), "--out", str(out / "outbox-png"),
        "--format", "png")
    run("owner-agent", "decrypt", "--key", "demo-owner", "--shards", str(out / "outbox-png"), "--out", str(out / "decrypted"))
    run("owner-agent", "preview", "--key", "demo-owner", "--data", str(SAMPLE), "--out", str(out / "preview.png"))
    run("orchestrator", "check", str(ROOT / "deploy" / "local-cpu.yaml"))

    # Verify: every decrypted image equals the plain prepared image (colour EtC is exact).
    from owners.images import load_rgb  # the demo's own check, not part of the flow

    classes = json.loads((out / "outbox-png" / "manifest.json").read_text())["classes"]
    mismatches = 0
    index = [json.loads(line) for line in (out / "outbox-png" / "local" / "index.jsonl").read_text().splitlines()]
    for entry in index:
        restored = np.asarray(Image.open(out / "decrypted" / classes[entry["label"]] / f"{entry['id']}.png"))
        mismatches += not np.array_equal(restored, load_rgb(SAMPLE / entry["file"], 32)[0])
    manifest = json.loads((out / "outbox" / "manifest.json").read_text())
    print(f"\noutbox {out / 'outbox'}: {manifest['count']} encrypted images, key id {manifest['key_id']}, "
          f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.2f} MB in {len(manifest['shards'])} shard(s)")
    print(f"round trip: {len(index) - mismatches}/{len(index)} images decrypted bit-exactly")
    print(f"preview: {out / 'preview.png'}")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
