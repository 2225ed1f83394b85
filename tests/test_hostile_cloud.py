"""A hostile cloud against the owner's machine, in real processes on loopback.

The cloud submits its own Flower App: a ClientApp of its own (``evil:app``) plus the Python file
that defines it, which on import reads the owner's key through the product's own key resolver and
writes it where the cloud could pick it up. The owner's SuperNode must refuse the run before any
of that code runs.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from orchestrator.auth import token_sha256
from orchestrator.config import load_config
from orchestrator.federate import FEDERATION, SuperLink, write_app
from orchestrator.ingest import start_ingest
from owners.app_guard import INSTALLED_CLIENTAPP, ForeignApp, check_fab
from owners.keys import read_key_file
from protocol.net import free_port
from tests.test_federated import owner_data
from tests.test_launch import CLASSES

ROOT = Path(__file__).resolve().parents[1]
WAIT = 240  # seconds: upper bound of any wait below

EVIL = '''
from pathlib import Path
from owners.keys import resolve_key

canary = Path({canary!r})
canary.write_text("the cloud's code ran at the owner\\n")
try:
    key, _ = resolve_key("mine", create=False)
    canary.write_text(key.secret.hex())
except Exception as exc:
    canary.write_text("ran, key not read: " + repr(exc))

from flwr.clientapp import ClientApp
app = ClientApp()
'''


def hostile_app(folder: Path, canary: Path) -> Path:
    """The cloud's own app: our server app, its own client app and the code that defines it."""
    write_app(folder)
    pyproject = folder / "pyproject.toml"
    text = pyproject.read_text().replace(f'clientapp = "{INSTALLED_CLIENTAPP}"', 'clientapp = "evil:app"')
    pyproject.write_text(text)
    (folder / "evil.py").write_text(EVIL.format(canary=str(canary)))
    return folder


def fab_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        for name, data in files.items():
            fab.writestr(name, data)
    return buffer.getvalue()


def test_only_a_code_free_app_naming_the_installed_client_passes(tmp_path):
    write_app(tmp_path / "app")
    pyproject = (tmp_path / "app" / "pyproject.toml").read_bytes()
    check_fab(fab_bytes({"pyproject.toml": pyproject, ".info/CONTENT": b"pyproject.toml,x,1\n"}))
    refused = [
        {"pyproject.toml": pyproject, "evil.py": b"print('hi')"},  # ships code
        {"pyproject.toml": pyproject, "owners/client_app.py": b""},  # shadows the installed client
        {"pyproject.toml": pyproject.replace(INSTALLED_CLIENTAPP.encode(), b"evil:app")},  # names another client
        {"pyproject.toml": pyproject.replace(INSTALLED_CLIENTAPP.encode(), b"owners.keys:app")},
        {"pyproject.toml": b"not toml ["},
        {"../pyproject.toml": pyproject},
    ]
    for files in refused:
        with pytest.raises(ForeignApp, match="refused the server's Flower app"):
            check_fab(fab_bytes(files))
    with pytest.raises(ForeignApp, match="not a zip"):
        check_fab(b"PK\x03\x04 truncated")


@pytest.mark.slow
def test_a_cloud_that_submits_its_own_client_app_runs_no_code_at_the_owner(tmp_path):
    ingest_port, flower_port = free_port(), free_port()
    token = "hostile-cloud-token-owner"
    config = {
        "name": "hostile",
        "task": {"classes": CLASSES},
        "ingest": {"listen": f"127.0.0.1:{ingest_port}", "store": str(tmp_path / "store"), "insecure_loopback": True,
                   "owners": [{"id": "clinic", "token_sha256": token_sha256(token)}]},
        "training": {"strategy": "federated", "epochs": 1, "batch_size": 8},
        "federated": {"listen": f"127.0.0.1:{flower_port}", "local_epochs": 1, "min_owners": 1,
                      "round_timeout_s": 60},
    }
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "cluster.yaml")
    canary = tmp_path / "canary.txt"
    home = tmp_path / "home"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1", "OWNER_AGENT_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "owners.cli", "keygen", "mine"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)
    secret = read_key_file(home / "keys" / "mine.key").secret
    token_file = tmp_path / "owner.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    train, _ = owner_data(tmp_path / "data", 0)
    ingest = start_ingest(cfg)
    link = SuperLink(cfg.federated.listen, tmp_path / "flower-home", tmp_path / "superlink.log")
    owner_log = tmp_path / "owner.err"
    owner = None
    try:
        owner = subprocess.Popen(
            [sys.executable, "-m", "owners.cli", "federate", "--key", "mine", "--data", str(train),
             "--server", f"127.0.0.1:{ingest_port}", "--token-file", str(token_file),
             "--flower", f"127.0.0.1:{flower_port}", "--insecure", "--no-progress"],
            cwd=ROOT, env=env, stdout=open(tmp_path / "owner.out", "wb"), stderr=open(owner_log, "wb"),
            start_new_session=True)
        app = hostile_app(tmp_path / "hostile-app", canary)
        run_config = f'cluster-config="{tmp_path / "cluster.yaml"}" out-dir="{tmp_path / "result"}"'
        deadline = time.monotonic() + WAIT
        while not (submitted := link.flwr("run", str(app), FEDERATION, "--run-config", run_config)).get("success"):
            assert time.monotonic() < deadline, f"the SuperLink did not take the run: {submitted}"
            time.sleep(1)
        while "refused the server's Flower app" not in owner_log.read_text(errors="replace"):
            assert not canary.exists(), f"the cloud's code ran at the owner: {canary.read_text()[:80]}"
            assert owner.poll() is None, owner_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no refusal:\n" + owner_log.read_text()[-3000:]
            time.sleep(0.5)
        assert "it ships evil.py" in owner_log.read_text()
    finally:
        if owner is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(owner.pid, signal.SIGKILL)
        link.stop()
        ingest.stop(1)
    assert not canary.exists(), f"the cloud's code ran at the owner: {canary.read_text()[:80]}"
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
              and p.parent != home / "keys" and secret.hex().encode() in p.read_bytes()]
    assert not leaked, f"the key's hex appears in {leaked}"
