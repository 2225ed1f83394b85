"""Ingest under load on loopback: an honest owner's GetTask latency and upload time while a hostile
owner holds silent upload streams and a stranger holds silent TCP connections.

Three processes: the ingest service (``orchestrator ingest``, as in production), the attacker
(this script with ``--attack``), and the honest owner-agent here. The hostile owner has a valid
token and keeps trying to hold ``--streams`` upload streams that never send a byte (a refused or
ended stream is opened again 0.2 s later); the stranger opens ``--connections`` TCP connections
and never sends anything. The honest owner uploads a CIFAR-10 outbox with the agent's own code
while GetTask is called every 0.1 s. Each scenario starts a fresh service and store.

``--like-before`` adds a scenario with the limits set as loose as the code before them (8 worker
threads, no practical per-owner stream cap, an hour of idle time, gRPC's 120 s handshake timeout):
what the issue measured.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import yaml

from benchmarks._common import ROOT, report, wait_for_port
from benchmarks.upload_throughput import prepare_outbox
from orchestrator.auth import token_sha256
from owners.upload import Connection, IngestClient, upload_outbox
from protocol.net import free_port
from protocol.proto import ingest_pb2 as pb
from protocol.proto import ingest_pb2_grpc as pb_grpc
from protocol.shards import Manifest

TOKENS = {"honest": "honest-token-0123456789", "hostile": "hostile-token-9876543210"}
LIKE_BEFORE = {"workers": 8, "max_streams_per_owner": 1024, "stream_idle_timeout_s": 3600.0,
               "handshake_timeout_s": 120.0}
GET_TASK_TIMEOUT_S = 10.0  # a GetTask slower than this counts as failed


# ------------------------------------------------------------------ the attacker (its own process)


def attack(port: int, streams: int, connections: int) -> None:
    """Hold silent connections and silent streams until SIGTERM; then print what happened as JSON."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    stop = threading.Event()
    tally = {"opened": 0, "ended": {}}
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    upload = pb_grpc.IngestStub(channel).UploadShard
    metadata = (("authorization", f"Bearer {TOKENS['hostile']}"),)

    def silence():
        stop.wait()
        return
        yield  # a generator that never yields

    def open_stream():
        tally["opened"] += 1
        return upload.future(silence(), metadata=metadata, timeout=3600)

    slots = [open_stream() for _ in range(streams)]
    started = time.monotonic()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    held = 0
    while not stop.wait(0.2):
        held = sum(not f.done() for f in slots)  # streams that lasted at least 0.2 s: the server holds them
        for i, future in enumerate(slots):
            if future.done() and not stop.is_set():
                code = future.exception().code().name if future.exception() else "OK"
                tally["ended"][code] = tally["ended"].get(code, 0) + 1
                slots[i] = open_stream()
    closed = sum(closed_by_server(s) for s in sockets)
    print(json.dumps({"streams_opened": tally["opened"], "streams_ended": tally["ended"], "streams_held": held,
                      "connections": connections, "connections_closed_by_server": closed,
                      "seconds": round(time.monotonic() - started, 1)}), flush=True)
    channel.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Read what the server sent (its HTTP/2 SETTINGS, maybe a GOAWAY): closed if the stream ended."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset by the server
        return True


# ------------------------------------------------------------------ the honest owner (here)


def start_service(work: Path, name: str, limits: dict) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    cfg = {"name": "bench", "task": {"classes": list(Manifest.load(work / "outbox").classes)},
           "ingest": {"listen": f"127.0.0.1:{port}", "store": str(work / f"store-{name}"), "insecure_loopback": True,
                      "owners": [{"id": o, "token_sha256": token_sha256(t)} for o, t in TOKENS.items()],
                      **limits}}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    log_path = work / f"ingest-{name}.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ingest", str(work / f"{name}.yaml")],
                                  stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    wait_for_port(port, server, log=log_path)
    return server, port, log_path


def honest_owner(port: int, outbox: Path, hold_s: float) -> dict:
    """Upload ``outbox`` while calling GetTask every 0.1 s (at least ``hold_s`` seconds in all)."""
    client = IngestClient(Connection(f"127.0.0.1:{port}", TOKENS["honest"]), log=lambda m: None)
    probe = pb_grpc.IngestStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    metadata = (("authorization", f"Bearer {TOKENS['honest']}"),)
    outcome: dict = {}

    def run_upload():
        t0 = time.perf_counter()
        try:
            state = upload_outbox(outbox, client, progress=False)
            outcome["upload_s"] = time.perf_counter() - t0 if state.committed else None
        except Exception as exc:  # the figure is "did not complete", with why
            outcome["upload_s"], outcome["upload_error"] = None, str(exc)[:200]

    uploader = threading.Thread(target=run_upload)
    started = time.monotonic()
    uploader.start()
    latencies, failures = [], []
    while uploader.is_alive() or time.monotonic() - started < hold_s:
        t0 = time.perf_counter()
        try:
            probe.GetTask(pb.GetTaskRequest(), metadata=metadata, timeout=GET_TASK_TIMEOUT_S)
            latencies.append(time.perf_counter() - t0)
        except grpc.RpcError as exc:
            failures.append(exc.code().name)
        time.sleep(0.1)  # pacing of the probe, not a measurement
    uploader.join()
    client.close()
    return {**outcome, "latencies": latencies, "failures": failures}


def scenario(work: Path, name: str, limits: dict, streams: int, connections: int, hold_s: float) -> dict:
    server, port, log_path = start_service(work, name, limits)
    attacker = None
    try:
        if streams or connections:
            attacker = subprocess.Popen([sys.executable, "-m", "benchmarks.ingest_under_load", "--attack", str(port),
                                         "--streams", str(streams), "--connections", str(connections)],
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
            assert attacker.stdout.readline().strip() == "ready", "the attacker did not start"
        result = honest_owner(port, work / "outbox", hold_s if attacker else 0)
        if attacker:
            attacker.send_signal(signal.SIGTERM)
            result["attack"] = json.loads(attacker.stdout.readline())
            attacker.wait(30)
    finally:
        if attacker and attacker.poll() is None:
            attacker.kill()
        server.terminate()
        server.wait(30)
    return result


def row(name: str, r: dict, streams: int, connections: int) -> list:
    lat = r["latencies"]
    attack = r.get("attack", {})
    ended = ", ".join(f"{k} {v}" for k, v in sorted(attack.get("streams_ended", {}).items())) or "-"
    return [name, f"{streams} / {connections}",
            f"{r['upload_s']:.2f}" if r["upload_s"] is not None else "did not complete",
            len(lat), f"{len(r['failures'])}" + (f" ({r['failures'][0]})" if r["failures"] else ""),
            f"{statistics.median(lat) * 1000:.1f}" if lat else "-", f"{max(lat) * 1000:.1f}" if lat else "-",
            attack.get("streams_held", "-"), ended,
            f"{attack['connections_closed_by_server']} after {attack['seconds']} s" if attack else "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "examples" / "cifar10-sample" / "train"))
    parser.add_argument("--per-class", type=int, default=300, help="images per class (the sample has 300)")
    parser.add_argument("--shard-images", type=int, default=150)
    parser.add_argument("--streams", type=int, default=50, help="silent upload streams the hostile owner holds")
    parser.add_argument("--connections", type=int, default=1000, help="silent TCP connections")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds the load lasts at least (> the 10 s "
                        "handshake timeout, to see silent connections closed)")
    parser.add_argument("--like-before", action="store_true", help="also run with limits as loose as before")
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.attack:
        return attack(args.attack, args.streams, args.connections)

    work = Path(tempfile.mkdtemp(prefix="ingest-load-"))
    try:
        prepare_outbox(Path(args.data), work, args.per_class, args.shard_images)
        manifest = Manifest.load(work / "outbox")
        runs = [("no load", {}, 0, 0), ("under load, default limits", {}, args.streams, args.connections)]
        if args.like_before:
            runs.append(("under load, limits as loose as before", LIKE_BEFORE, args.streams, args.connections))
        results = {name: scenario(work, f"s{i}", limits, s, c, args.hold)
                   for i, (name, limits, s, c) in enumerate(runs)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [row(name, results[name], s, c) for name, _, s, c in runs]
    report("Ingest under load (loopback)",
           ["scenario", "silent streams / connections", "honest upload s", "GetTask calls", "GetTask failed",
            "GetTask p50 ms", "GetTask max ms", "hostile streams held at end", "hostile streams ended",
            "silent connections closed"], rows,
           [f"honest owner: {manifest.count} encrypted CIFAR-10 images in {len(manifest.shards)} shards "
            f"({sum(s.bytes for s in manifest.shards) / 1e6:.1f} MB), the agent's upload (2 streams); GetTask every "
            f"0.1 s during the upload and for at least {args.hold:g} s, {GET_TASK_TIMEOUT_S:g} s deadline.",
            "hostile owner: valid token, re-opens every refused or ended stream 0.2 s later; stranger: TCP "
            "connections that never send a byte. Default limits: 4 streams per owner, 60 s idle, 10 s handshake.",
            "Target (issue): the honest upload completes and GetTask answers within 2 s under 50 silent streams "
            "and 1,000 silent connections."],
           args.json, extra={"results": results})


if __name__ == "__main__":
    main()
