"""``orchestrator federate cluster.yaml``: the federated mode with Flower (SuperLink + ServerApp).

Owners keep their data and their key-specific adapter; the orchestrator runs a Flower SuperLink,
submits the federation (a Flower App whose components are the installed
``orchestrator.server_app:app`` and ``owners.client_app:app``), and waits for it. The ingest
service runs alongside so that owners fetch the task (image size, block size, scheme) with their
token, exactly as for uploads. Experiments run the same ServerApp/ClientApp in Flower's
simulation on Ray (:func:`simulate`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlcore.federated import FederatedPlan
from orchestrator.config import ClusterConfig, FederatedConfig
from orchestrator.errors import RunFailed
from orchestrator.server_app import FINAL_CHECKPOINT, make_server_app, plan_for

BIN = Path(sys.executable).parent  # flower-superlink / flwr live beside this interpreter
FEDERATION = "etc"


def flower_env(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


def write_app(folder: Path) -> Path:
    """A Flower App holding no code: its components are modules installed with this package. An
    owner's SuperNode accepts only such an app and runs the owner's own installed client
    (``owners/app_guard.py`` refuses any app that ships code or names another client)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "etc-federated"\nversion = "1.0.0"\ndescription = "EtC federated training"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "etc-orchestrator"\n\n'
        '[tool.flwr.app.components]\nserverapp = "orchestrator.server_app:app"\nclientapp = "owners.client_app:app"\n\n'
        '[tool.flwr.app.config]\ncluster-config = ""\nout-dir = ""\n')
    return folder


def control_address(listen: str) -> str:
    """Where this machine reaches the SuperLink's Control API (one port with the Fleet and Runtime APIs
    since Flower 1.41): a bind-all address becomes loopback, as Flower's own SuperExec does, so that a
    TLS certificate is checked against a name it can hold (127.0.0.1), never against 0.0.0.0."""
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    return f"{host}:{port}"


def cli_config(address: str, tls=None) -> str:
    """The flwr CLI's ``config.toml``: one SuperLink connection, TLS with the CA when ``tls`` is set."""
    lines = ["[superlink]", f"default = {json.dumps(FEDERATION)}", "", f"[superlink.{FEDERATION}]",
             f"address = {json.dumps(address)}", f"insecure = {'true' if tls is None else 'false'}"]
    if tls is not None:  # a TOML basic string is a JSON string; flwr wants an absolute path
        lines.append(f"root-certificates = {json.dumps(str(Path(tls.ca).resolve()))}")
    return "\n".join(lines) + "\n"


class SuperLink:
    """flower-superlink in its own process group (it starts helper processes of its own)."""

    def __init__(self, listen: str, home: Path, log_file: Path, tls=None) -> None:
        host, _, port = listen.rpartition(":")
        home.mkdir(parents=True, exist_ok=True)
        # With TLS, only SuperNodes whose public key is registered may join (Flower allows node
        # authentication over TLS only; plaintext is for loopback, one machine, anyway).
        security = ["--insecure"] if tls is None else [
            "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--enable-supernode-auth"]
        self.address = control_address(listen)
        (home / "config.toml").write_text(cli_config(self.address, tls))
        self.env = flower_env(home)
        self.log = open(log_file, "ab")  # noqa: SIM115 - open for the process's lifetime
        command = [str(BIN / "flower-superlink"), *security, "--host", host.strip("[]"), "--port", port]  # Flower
        # brackets an IPv6 host itself
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def flwr(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> dict:
        out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=self.env, cwd=cwd,
                             capture_output=True, text=True, timeout=timeout)
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError:
            raise RunFailed(f"flwr {args[0]} failed: {(out.stdout + out.stderr).strip()[-500:]}") from None

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def not_answering(link: SuperLink, cfg: ClusterConfig, log_file: Path) -> str:
    why = f"the Flower SuperLink on {cfg.federated.listen} did not answer the flwr CLI at {link.address}"
    if cfg.ingest.tls is not None:  # a certificate that does not name the address reads as "unavailable" too
        why += (f" over TLS (ingest.tls.cert must name {link.address.rpartition(':')[0]} and be signed by "
                f"ingest.tls.ca {cfg.ingest.tls.ca})")
    return f"{why}; see {log_file}"


def answered(link: SuperLink, cfg: ClusterConfig, log_file: Path, *args: str) -> dict:
    """``flwr *args`` once the SuperLink answers (it takes a few seconds to listen after starting)."""
    deadline = time.monotonic() + 60
    while True:
        answer = link.flwr(*args)
        if answer.get("success") or "unavailable" not in str(answer.get("error-message", "")):
            return answer
        if time.monotonic() > deadline or link.process.poll() is not None:
            raise RunFailed(not_answering(link, cfg, log_file))
        time.sleep(1)


def register_owner_nodes(link: SuperLink, cfg: ClusterConfig, work: Path) -> None:
    """With TLS, register every owner's SuperNode public key (ingest.owners[].node_public_key):
    a SuperNode whose key is not registered cannot join, whatever token its owner holds."""
    if cfg.ingest.tls is None:
        return
    folder = work / "node-keys"
    folder.mkdir(parents=True, exist_ok=True)
    for owner in cfg.ingest.owners:
        path = folder / f"{owner.id}.pub"
        path.write_text(f"{owner.node_public_key}\n")
        answer = answered(link, cfg, work / "superlink.log", "supernode", "register", str(path), FEDERATION,
                          "--name", owner.id)
        if not answer.get("success"):
            raise RunFailed(f"registering {owner.id}'s node key with the SuperLink failed: {answer}")


def run_federation(cfg: ClusterConfig, work: Path, stop: threading.Event, log=print, poll_s: float = 2.0) -> Path:
    """Start the SuperLink, submit the federation, wait for it to finish; returns the trunk checkpoint."""
    plan = plan_for(cfg)
    work = Path(work)
    out_dir = work / "result"
    app_dir = write_app(work / "app")
    link = SuperLink(cfg.federated.listen, work / "flower-home", work / "superlink.log", cfg.ingest.tls)
    try:
        register_owner_nodes(link, cfg, work)
        run_config = f'cluster-config="{cfg.source}" out-dir="{out_dir}"'
        submitted = answered(link, cfg, work / "superlink.log", "run", str(app_dir), FEDERATION, "--run-config",
                             run_config)
        if not submitted.get("success"):
            raise RunFailed(f"flwr run refused the federation: {submitted}")
        run_id = str(submitted["run-id"])
        secure = " with secure aggregation (SecAgg+)" if cfg.federated.secure_aggregation else ""
        work_per_round = (f"{plan.local_epochs} local epoch(s)" if plan.rounds_per_epoch == 1 else
                          f"1/{plan.rounds_per_epoch} local epoch")
        log(f"federation submitted (Flower run {run_id}): {plan.rounds} rounds x {work_per_round}, "
            f"{cfg.federated.server_optimizer}{secure}; owners connect their SuperNodes to {cfg.federated.listen}")
        status = ""
        while not status.startswith("finished"):
            if stop.wait(poll_s):
                link.flwr("stop", run_id, FEDERATION)
                raise KeyboardInterrupt
            status = link.flwr("ls", FEDERATION, "--run-id", run_id)["runs"][0]["status"]
        server_log = subprocess.run([str(BIN / "flwr"), "log", run_id, FEDERATION, "--show"], env=link.env,
                                    capture_output=True, text=True, timeout=120)
        (work / "serverapp.log").write_text(server_log.stdout + server_log.stderr)
        if status != "finished:completed" or not (out_dir / FINAL_CHECKPOINT).exists():
            raise RunFailed(f"federation ended {status}; ServerApp log: {work / 'serverapp.log'}")
        return out_dir / FINAL_CHECKPOINT
    finally:
        link.stop()


def simulate(plan: FederatedPlan, client_app, num_owners: int, min_owners: int, out_dir: Path,
             round_timeout_s: float = 3600.0, cpus: int = 2, secure: bool = False,
             federated: FederatedConfig | None = None) -> Path:
    """The same ServerApp and ClientApp in Flower's simulation on Ray (Flower starts and stops Ray);
    ``secure``: with secure aggregation (SecAgg+); ``federated``: the server optimiser and the other
    server-side options (the plan carries the owners' side)."""
    from flwr.simulation import run_simulation

    shutil.rmtree(out_dir, ignore_errors=True)
    run_simulation(server_app=make_server_app(plan, min_owners, round_timeout_s, Path(out_dir), secure, federated),
                   client_app=client_app, num_supernodes=num_owners, backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": max(1, cpus // min(num_owners, cpus)),
                                                        "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "log_to_driver": False}})
    return Path(out_dir) / FINAL_CHECKPOINT
