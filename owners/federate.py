"""``owner-agent federate``: join a federation with a Flower SuperNode; the data never leaves.

    owner-agent federate --key NAME --data DIR [--test-data DIR] --server HOST:PORT --token-file F \\
        --flower HOST:PORT

Fetches the task from the ingest service (as an upload would), encrypts DIR into a local outbox
(reused when unchanged), then runs a Flower SuperNode whose ClientApp (``owners/client_app.py``,
installed here) trains on that outbox. The SuperNode's node config names the outbox folders, the
key (its keyring name or file path: never the secret) and where the private adapter is kept.
It runs until Ctrl-C, serving every federation the orchestrator starts.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from owners.agent import default_outbox, encrypt_unless_current
from owners.encrypt import EncryptSettings
from owners.errors import OwnerError, TaskMismatch
from owners.files import check_not_shared, private_dir
from owners.keys import OwnerKey, check_private, keyring_dir
from owners.upload import Connection, IngestClient
from protocol.net import free_port

BIN = Path(sys.executable).parent
NODE_KEY_FILE = "node-key"  # in $OWNER_AGENT_HOME/federated/: the SuperNode's authentication key


def node_config(values: dict[str, str]) -> str:
    """Flower's ``--node-config`` syntax: space-separated key="value" pairs."""
    for k, v in values.items():
        if '"' in v or "\\" in v:
            raise OwnerError(f"{k}: {v!r} contains a quote or backslash, which a node config cannot hold")
    return " ".join(f'{k}="{v}"' for k, v in values.items())


def prepare_federation(key_spec: str, key: OwnerKey, data: Path, test_data: Path | None, conn: Connection,
                       adapter_init: str, progress: bool | None, log) -> dict[str, str]:
    """Fetch the task, encrypt the owner's splits; returns the SuperNode's node config.

    The task's privacy verdict is shown but never refused here: the encrypted outbox stays on this
    machine and only model updates leave it, so what the verdict measures (a cloud attacking uploaded
    images) does not happen."""
    client = IngestClient(conn, log)
    try:
        offer = client.get_task()
    finally:
        client.close()
    if not offer.task.encrypted:
        raise TaskMismatch("the server's task is plain: federated training here needs an encrypted scheme")
    log(offer.describe())
    note = offer.privacy_note()
    log(f"{note}. Not refused: federated training sends no images, they stay on this machine")
    config = {"key": key_spec, "adapter-init": adapter_init}
    for split, folder in (("train", data), ("test", test_data)):
        if folder is None:
            continue
        outbox = default_outbox(conn.server, offer.run_name, offer.owner_id, split, key.key_id)
        private_dir(outbox)
        encrypt_unless_current(folder, outbox, key, EncryptSettings(task=offer.task, split=split), progress, log)
        config[split] = str(outbox)
    state = keyring_dir().parent / "federated" / offer.run_name / offer.owner_id
    private_dir(state)
    config["state-dir"] = str(state)
    return config


def node_key(home: Path) -> tuple[Path, str]:
    """The private key this owner's SuperNode authenticates with (created on first use, 0600, never
    sent anywhere) and the public key line the operator registers (ingest.owners[].node_public_key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = private_dir(home / "federated") / NODE_KEY_FILE
    if not path.exists():
        pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            f.write(pem)
    check_private(path, "node key file")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError):
        raise OwnerError(f"node key file {path} is malformed; remove it to make a new one (and have it "
                         "registered)") from None
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, public.decode("ascii")


def run_supernode(flower: str, config: dict[str, str], ca_file: Path | None, insecure: bool, log) -> int:
    """Run the SuperNode in the foreground until it exits or Ctrl-C; returns its exit code."""
    if not insecure and ca_file is None:
        raise OwnerError("--ca-file is required for a TLS connection to the Flower server (or --insecure on loopback)")
    security = ["--insecure"]
    if not insecure:  # over TLS the SuperNode also proves it is this owner's registered node
        key_file, public = node_key(keyring_dir().parent)
        security = ["--root-certificates", str(ca_file), "--auth-supernode-private-key", str(key_file)]
        log(f"this node's public key (registered by the operator as your node_public_key): {public}")
    cmd = [str(BIN / "flower-supernode"), *security, "--superlink", flower, "--port", str(free_port()),
           "--node-config", node_config(config)]
    home = keyring_dir().parent
    # First on the PATH: the guarded flwr-clientapp (only the installed client runs); then this
    # interpreter's flower-superexec, which the SuperNode starts and which starts flwr-clientapp.
    path = os.pathsep.join([str(guarded_clientapp_bin(home)), str(BIN), os.environ.get("PATH", "")])
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0",  # a privacy product sends no telemetry
           "OWNER_AGENT_HOME": str(home), "PATH": path}
    log(f"joining the federation at {flower}; adapter and data stay in {config['state-dir']} and your outbox. "
        "Ctrl-C leaves.")
    # Same process group as this agent (Ctrl-C and a kill reach the SuperNode too), and on Linux the
    # SuperNode also gets SIGTERM if this agent dies without a chance to stop it.
    process = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        raise


def guarded_clientapp_bin(home: Path) -> Path:
    """A private folder holding a ``flwr-clientapp`` that runs ``owners/app_guard.py``: Flower starts
    ``flwr-clientapp`` by name for every run, so the SuperNode gets this one, never one that installs
    and imports the server's app. Rewritten on every start; ``-I``: no current directory, no
    PYTHON* variables in the guard's import path."""
    folder = private_dir(home / "federated" / "bin")
    check_not_shared(folder, "the folder of the guarded flwr-clientapp")
    script, tmp = folder / "flwr-clientapp", folder / ".flwr-clientapp.partial"
    tmp.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -m owners.app_guard "$@"\n')
    tmp.chmod(0o700)
    tmp.replace(script)
    return folder


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
