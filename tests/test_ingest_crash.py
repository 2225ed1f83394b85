"""Crashes mid-upload: the agent killed with SIGKILL, the server killed with SIGKILL. Real processes."""
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.auth import token_sha256
from protocol.net import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "cifar10-sample" / "train"  # 3000 images -> 20 shards of 150
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOKENS = {"hospital-a": "token-a-crash-1", "hospital-b": "token-b-crash-2"}
SHARDS = 20
WAIT = 90  # seconds: upper bound on any wait below


@pytest.fixture
def setup(tmp_path):
    port = free_port()
    cfg = {"name": "crash", "task": {"classes": CLASSES},
           "ingest": {"listen": f"127.0.0.1:{port}", "store": str(tmp_path / "store"), "insecure_loopback": True,
                      "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in TOKENS.items()]},
           "training": {"strategy": "pooled"}}  # each owner uploads under its own key
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    for owner, token in TOKENS.items():
        path = tmp_path / f"{owner}.token"
        path.write_text(token)
        path.chmod(0o600)
    procs = []
    yield tmp_path, port, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def start_server(tmp_path, procs):
    log = open(tmp_path / "server.out", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ingest", str(tmp_path / "cluster.yaml")],
                            stdout=log, stderr=log, cwd=ROOT)
    procs.append(proc)
    deadline = time.monotonic() + WAIT
    while b"Ctrl-C stops" not in (tmp_path / "server.out").read_bytes():
        assert proc.poll() is None, (tmp_path / "server.out").read_text()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return proc


def start_agent(tmp_path, port, owner, procs, *extra):
    env = {**os.environ, "OWNER_AGENT_HOME": str(tmp_path / f"home-{owner}")}
    out = open(tmp_path / f"agent-{owner}.out", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "owners.cli", "--key", f"key-{owner}", "--data", str(SAMPLE),
         "--server", f"127.0.0.1:{port}", "--token-file", str(tmp_path / f"{owner}.token"),
         "--shard-images", "150", "--no-progress", "--accept-cloud-can-decrypt", *extra],
        stdout=out, stderr=out, env=env, cwd=ROOT)
    procs.append(proc)
    return proc


def catalog(tmp_path, sql, args=()):
    db_path = tmp_path / "store" / "crash" / "catalog.sqlite"
    if not db_path.exists():
        return []
    with sqlite3.connect(db_path, timeout=10) as db:
        return db.execute(sql, args).fetchall()


def stored_count(tmp_path, owner) -> int:
    try:
        return catalog(tmp_path, "SELECT COUNT(*) FROM owner_objects WHERE owner = ?", (owner,))[0][0]
    except (IndexError, sqlite3.OperationalError):
        return 0


def wait_for_stored(tmp_path, owner, at_least, proc):
    deadline = time.monotonic() + WAIT
    while stored_count(tmp_path, owner) < at_least:
        assert proc.poll() is None, (tmp_path / f"agent-{owner}.out").read_text()[-2000:]
        assert time.monotonic() < deadline, f"{owner}: fewer than {at_least} shards stored in time"
        time.sleep(0.02)


def check_catalog_matches_outbox(tmp_path, owner):
    """Exactly one committed dataset whose shards are the manifest's, every one stored once."""
    outboxes = list((tmp_path / f"home-{owner}" / "outbox").rglob("manifest.json"))
    assert len(outboxes) == 1
    manifest = json.loads(outboxes[0].read_text())
    datasets = catalog(tmp_path, "SELECT id, images, committed FROM datasets WHERE owner = ?", (owner,))
    assert [(d[1], d[2]) for d in datasets] == [(manifest["count"], 1)]
    shards = catalog(tmp_path, "SELECT name, sha256, images FROM dataset_shards WHERE dataset_id = ? ORDER BY name",
                     (datasets[0][0],))
    assert shards == [(s["name"], s["sha256"], s["count"]) for s in manifest["shards"]]
    assert len(shards) == SHARDS
    owned = catalog(tmp_path, "SELECT sha256 FROM owner_objects WHERE owner = ?", (owner,))
    assert sorted(o[0] for o in owned) == sorted(s[1] for s in shards)
    for _, sha, _ in shards:
        path = tmp_path / "store" / "crash" / "objects" / sha[:2] / sha
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert not list((tmp_path / "store" / "crash" / "incoming" / owner).glob("*.part"))


def test_agents_killed_repeatedly_then_rerun_complete(setup):
    tmp_path, port, procs = setup
    start_server(tmp_path, procs)
    # two owners at once; each agent killed with SIGKILL twice at different points, then rerun
    for stop_at in (3, 11):
        agents = {o: start_agent(tmp_path, port, o, procs, "--max-rate", "1000000") for o in TOKENS}
        for owner, proc in agents.items():
            wait_for_stored(tmp_path, owner, stop_at, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        for owner in TOKENS:
            assert stop_at <= stored_count(tmp_path, owner) < SHARDS  # killed mid-upload
    finals = {o: start_agent(tmp_path, port, o, procs) for o in TOKENS}
    for owner, proc in finals.items():
        assert proc.wait(WAIT) == 0, (tmp_path / f"agent-{owner}.out").read_text()[-2000:]
        log = (tmp_path / f"agent-{owner}.out").read_text()
        assert log.count("not encrypting again") == 2  # the reruns reused the outbox
        check_catalog_matches_outbox(tmp_path, owner)


def test_server_killed_mid_upload_agent_resumes(setup):
    tmp_path, port, procs = setup
    server = start_server(tmp_path, procs)
    agent = start_agent(tmp_path, port, "hospital-a", procs, "--max-rate", "1000000")
    wait_for_stored(tmp_path, "hospital-a", 3, agent)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    assert stored_count(tmp_path, "hospital-a") < SHARDS
    start_server(tmp_path, procs)  # same port, same store
    assert agent.wait(WAIT) == 0, (tmp_path / "agent-hospital-a.out").read_text()[-2000:]
    assert "retrying" in (tmp_path / "agent-hospital-a.out").read_text() or \
        "where to resume" in (tmp_path / "agent-hospital-a.out").read_text()
    check_catalog_matches_outbox(tmp_path, "hospital-a")
