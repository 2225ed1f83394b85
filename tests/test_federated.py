"""The federated mode for real: `orchestrator federate` (ingest + Flower SuperLink + ServerApp) and
three `owner-agent federate` processes (Flower SuperNodes) on 127.0.0.1. One owner is SIGKILLed
while it trains in round 2; the federation finishes with the others. Only the trunk reaches the
server; no key secret appears in any process's argv or in the server's files."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mlcore.checkpoint import model_from_checkpoint
from mlcore.federated import SHARED_PREFIX, owner_model
from models import UnknownKeyError
from orchestrator.auth import token_sha256
from owners.keys import read_key_file
from protocol.net import free_port
from tests.test_launch import CLASSES, SAMPLE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OWNERS = ("clinic-a", "clinic-b", "clinic-c")
VICTIM = "clinic-c"
WAIT = 420  # seconds: upper bound of any wait below


def owner_data(root: Path, index: int) -> tuple[Path, Path]:
    """A different slice of the sample per owner: 10 train and 4 test images per class."""
    out = []
    for split, count in (("train", 10), ("test", 4)):
        for cls in CLASSES:
            target = root / split / cls
            target.mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[index * count:(index + 1) * count]:
                (target / f.name).symlink_to(f)
        out.append(root / split)
    return out[0], out[1]


def wait_for(condition, what: str, procs: dict, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        for name, p in procs.items():
            assert p.poll() is None or name == VICTIM, f"{name} exited early with {p.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def all_cmdlines() -> str:
    text = []
    for proc in Path("/proc").iterdir():
        try:
            text.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(text)


def test_federation_survives_an_owner_killed_mid_round(tmp_path):
    ingest_port, flower_port = free_port(), free_port()
    tokens = {o: f"federated-token-{o}" for o in OWNERS}
    config = {
        "name": "fed-test",
        "task": {"classes": CLASSES},
        "ingest": {"listen": f"127.0.0.1:{ingest_port}", "store": str(tmp_path / "store"), "insecure_loopback": True,
                   "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in tokens.items()]},
        "training": {"strategy": "federated", "epochs": 3, "batch_size": 32, "lr": 0.003},
        "federated": {"listen": f"127.0.0.1:{flower_port}", "local_epochs": 1, "rounds_per_epoch": 1, "min_owners": 2,
                      "round_timeout_s": 300},
    }
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen] = {}
    secrets = {}
    try:
        procs["orchestrator"] = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "federate", str(tmp_path / "cluster.yaml")], cwd=ROOT, env=env,
            stdout=open(logs / "orchestrator.out", "wb"), stderr=open(logs / "orchestrator.err", "wb"),
            start_new_session=True)
        for i, owner in enumerate(OWNERS):
            home = tmp_path / f"home-{owner}"
            owner_env = {**env, "OWNER_AGENT_HOME": str(home)}
            subprocess.run([sys.executable, "-m", "owners.cli", "keygen", "mine"], cwd=ROOT, env=owner_env, check=True,
                           capture_output=True, timeout=60)
            secrets[owner] = read_key_file(home / "keys" / "mine.key").secret
            token_file = tmp_path / f"{owner}.token"
            token_file.write_text(tokens[owner])
            token_file.chmod(0o600)
            train, test = owner_data(tmp_path / f"data-{owner}", i)
            procs[owner] = subprocess.Popen(
                [sys.executable, "-m", "owners.cli", "federate", "--key", "mine", "--data", str(train),
                 "--test-data", str(test), "--server", f"127.0.0.1:{ingest_port}", "--token-file", str(token_file),
                 "--flower", f"127.0.0.1:{flower_port}", "--insecure", "--no-progress"],
                cwd=ROOT, env=owner_env, stdout=open(logs / f"{owner}.out", "wb"),
                stderr=open(logs / f"{owner}.err", "wb"), start_new_session=True)
        state = tmp_path / f"home-{VICTIM}" / "federated" / "fed-test" / VICTIM

        def victim_training_round_2():
            if not (state / "status.json").exists():
                return False
            status = json.loads((state / "status.json").read_text())
            return status["round"] == 2 and status["phase"] == "training"

        wait_for(victim_training_round_2, f"{VICTIM} to start round 2", procs)
        cmdlines = all_cmdlines()
        assert "flower-supernode" in cmdlines and 'key="mine"' in cmdlines
        for secret in secrets.values():
            assert secret.hex() not in cmdlines and secret.hex().upper() not in cmdlines
        os.killpg(procs[VICTIM].pid, signal.SIGKILL)  # the owner's agent, SuperNode and ClientApp, mid-round
        assert procs["orchestrator"].wait(WAIT) == 0, (logs / "orchestrator.err").read_text()[-3000:]
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    result = json.loads((logs / "orchestrator.out").read_text())
    rounds = [json.loads(line) for line in Path(result["metrics"]).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(0 <= r["test/test_acc"] <= 1 for r in rounds)
    server_log = (Path(result["trunk_checkpoint"]).parents[1] / "serverapp.log").read_text()
    assert "1 failures" in server_log  # round 2 aggregated without the killed owner

    payload = torch.load(result["trunk_checkpoint"], map_location="cpu", weights_only=False)
    assert payload["strategy"] == "federated" and payload["key_ids"] == []
    assert all(k.startswith(SHARED_PREFIX) for k in payload["state_dict"])  # no adapter reached the server
    with pytest.raises(UnknownKeyError, match="stay with their owners"):
        model_from_checkpoint(payload)  # the cloud alone cannot predict
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not any(s in blob or s.hex().encode() in blob for s in secrets.values()), path

    # an owner who stayed predicts with its private adapter and the federation's trunk
    survivor = tmp_path / "home-clinic-a" / "federated" / "fed-test" / "clinic-a"
    adapter_file = next(survivor.glob("adapter-*.pt"))
    adapter = torch.load(adapter_file, weights_only=False)
    model = owner_model(payload, adapter)
    logits = model(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    assert logits.shape == (2, len(CLASSES))
    with pytest.raises(UnknownKeyError):
        model(torch.zeros(1, 3, 32, 32), torch.ones(1, dtype=torch.long))  # no second key here
