"""The federated mode over TLS: `orchestrator federate` with ingest.tls (cert, key, ca) runs the Flower
SuperLink with TLS and node authentication, and an owner joins with `owner-agent federate --ca-file`
(no --insecure) from the node whose key the operator registered; a node with a stolen token but an
unregistered key is refused. One owner, one round, 2 classes x 10 images: the point is the
certificates and keys, not the learning."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.auth import token_sha256
from orchestrator.config import TlsConfig
from orchestrator.federate import cli_config, control_address
from protocol.net import free_port
from tests.test_ingest_tls import _cert, _write
from tests.test_launch import SAMPLE

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile"]
OWNER = "clinic-a"
TOKEN = "federated-tls-token"
WAIT = 480  # seconds: upper bound of any wait below
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    folder = tmp_path_factory.mktemp("fed-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "federation test CA")])
    ca_pem, _ = _write(folder, "ca", _cert("federation test CA", ca_key, ca_name, ca_key, ca=True), ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    cert, key = _write(folder, "server", _cert("127.0.0.1", server_key, ca_name, ca_key, server=True), server_key)
    return {"ca": ca_pem, "cert": cert, "key": key}


def cluster(tmp_path: Path, pki: dict[str, Path], ingest_port: int, flower_port: int, with_ca: bool = True,
            node_key: str | None = None) -> Path:
    tls = {"cert": str(pki["cert"]), "key": str(pki["key"])}
    if with_ca:
        tls["ca"] = str(pki["ca"])
    config = {
        "name": "fed-tls",
        "task": {"classes": CLASSES},
        "ingest": {"listen": f"127.0.0.1:{ingest_port}", "store": str(tmp_path / "store"), "tls": tls,
                   "owners": [{"id": OWNER, "token_sha256": token_sha256(TOKEN), "node_public_key": node_key}]},
        "training": {"strategy": "federated", "epochs": 1, "batch_size": 8},
        "federated": {"listen": f"127.0.0.1:{flower_port}", "local_epochs": 1, "rounds_per_epoch": 1, "min_owners": 1,
                      "round_timeout_s": 300},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def owner_data(root: Path) -> tuple[Path, Path]:
    """10 train and 4 test images per class."""
    for split, count in (("train", 10), ("test", 4)):
        for cls in CLASSES:
            target = root / split / cls
            target.mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[:count]:
                (target / f.name).symlink_to(f)
    return root / "train", root / "test"


def wait_for(condition, what: str, procs: dict[str, subprocess.Popen], logs: Path):
    deadline = time.monotonic() + WAIT
    while not (value := condition()):
        for name, p in procs.items():
            assert p.poll() is None, f"{name} exited early with {p.returncode}: " + (
                logs / f"{name}.err").read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def tls_peer(port: int, ca: Path) -> dict:
    """The certificate the Flower port presents, verified against the CA for 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(ca))
    with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        return tls.getpeercert()


def plaintext_answer(port: int) -> bytes:
    """What a plaintext HTTP/1.1 request to the Flower port gets back (a TLS server never says HTTP/)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with contextlib.suppress(OSError):
            return raw.recv(64)
    return b""


def start(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)


def node_public_key(home: Path) -> str:
    """What `owner-agent node-key` prints: the line the owner gives the operator."""
    out = subprocess.run([sys.executable, "-m", "owners.cli", "node-key"], cwd=ROOT, check=True, text=True,
                         env={**ENV, "OWNER_AGENT_HOME": str(home)}, capture_output=True, timeout=60)
    return out.stdout.strip()


def join(tmp_path: Path, pki: dict[str, Path], ingest_port: int, flower_port: int, logs: Path,
         name: str = OWNER) -> subprocess.Popen:
    """An owner (its home: tmp_path / name): a key, a token file, its data; `owner-agent federate`
    over TLS with --ca-file."""
    owner_env = {**ENV, "OWNER_AGENT_HOME": str(tmp_path / name)}
    subprocess.run([sys.executable, "-m", "owners.cli", "keygen", "mine"], cwd=ROOT, env=owner_env, check=True,
                   capture_output=True, timeout=60)
    token_file = tmp_path / f"{name}.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    train, test = owner_data(tmp_path / f"data-{name}")
    return start(name, [sys.executable, "-m", "owners.cli", "federate", "--key", "mine", "--data", str(train),
                         "--test-data", str(test), "--server", f"127.0.0.1:{ingest_port}", "--token-file",
                         str(token_file), "--flower", f"127.0.0.1:{flower_port}", "--ca-file", str(pki["ca"]),
                         "--no-progress"], owner_env, logs)


@pytest.mark.slow
def test_federation_over_tls(tmp_path, pki):
    ingest_port, flower_port = free_port(), free_port()
    config = cluster(tmp_path, pki, ingest_port, flower_port, node_key=node_public_key(tmp_path / OWNER))
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["orchestrator"] = start(
            "orchestrator", [sys.executable, "-m", "orchestrator.cli", "federate", str(config)], ENV, logs)
        wait_for(lambda: "federation submitted" in (logs / "orchestrator.err").read_text(), "the submission",
                 procs, logs)
        peer = tls_peer(flower_port, pki["ca"])  # the SuperLink is up: it presents our certificate
        assert dict(x[0] for x in peer["subject"])["commonName"] == "127.0.0.1"
        assert not plaintext_answer(flower_port).startswith(b"HTTP/")
        # the same token on another machine: its node key is not the registered one
        procs["intruder"] = join(tmp_path, pki, ingest_port, flower_port, logs, name="intruder")
        procs[OWNER] = join(tmp_path, pki, ingest_port, flower_port, logs)
        wait_for(lambda: procs["orchestrator"].poll() is not None, "the federation to finish",
                 {OWNER: procs[OWNER]}, logs)
        assert procs["orchestrator"].returncode == 0, (logs / "orchestrator.err").read_text()[-3000:]
        intruder_exit = procs["intruder"].poll()  # it left by itself: the SuperLink refused its node key
        assert intruder_exit is not None and intruder_exit > 0, (logs / "intruder.err").read_text()[-2000:]
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
    result = json.loads((logs / "orchestrator.out").read_text().strip().splitlines()[-1])
    assert Path(result["trunk_checkpoint"]).is_file()
    rounds = [json.loads(line) for line in Path(result["metrics"]).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    state = Path("federated") / "fed-tls" / OWNER / "status.json"
    assert (tmp_path / OWNER / state).is_file()  # the registered node trained
    # ...and got the final trunk: it predicts at home, with nothing sent anywhere
    images = sorted((SAMPLE / "test" / CLASSES[0]).iterdir())[:2]
    out = subprocess.run([sys.executable, "-m", "owners.cli", "predict", "--key", "mine", "--federated",
                          str(tmp_path / OWNER / state.parent), *map(str, images)], cwd=ROOT, text=True,
                         env={**ENV, "OWNER_AGENT_HOME": str(tmp_path / OWNER)}, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == [str(p) for p in images]
    assert all(line.split("\t")[1].split()[0] in CLASSES for line in out.stdout.splitlines())
    assert not (tmp_path / "intruder" / state).exists(), (logs / "intruder.err").read_text()[-2000:]


def test_federated_tls_without_ca_is_refused(tmp_path, pki):
    config = cluster(tmp_path, pki, free_port(), free_port(), with_ca=False)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "check", str(config)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "ingest.tls.ca" in out.stderr
    config = cluster(tmp_path, pki, free_port(), free_port())  # with ca, but no owner's node key
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "check", str(config)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "ingest.owners[0].node_public_key: required" in out.stderr


def test_the_flwr_cli_reaches_a_bind_all_superlink_on_loopback_with_the_ca(pki, tmp_path, monkeypatch):
    """A SuperLink listening on 0.0.0.0 is reached at 127.0.0.1 (a name a certificate can hold: Flower's
    SuperExec does the same), and Flower's own reader accepts the CLI config, CA included."""
    from flwr.cli.flower_config import read_superlink_connection

    assert control_address("0.0.0.0:9092") == "127.0.0.1:9092"
    assert control_address("[::]:9092") == "[::1]:9092"
    assert control_address("fl.example.org:9092") == "fl.example.org:9092"
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    for tls in (TlsConfig(cert=pki["cert"], key=pki["key"], ca=pki["ca"]), None):
        (tmp_path / "config.toml").write_text(cli_config("127.0.0.1:9092", tls))
        link = read_superlink_connection()
        assert (link.address, link.insecure) == ("127.0.0.1:9092", tls is None)
        assert link.root_certificates == (None if tls is None else str(pki["ca"]))
