"""Upload throughput on loopback: owner-agent's resumable, verified upload vs a bare gRPC stream.

Both servers run in their own process (as in production); the client runs here. The bare stream
sends the same shard files in the same 1 MiB chunks to a server that only counts the bytes: the
ceiling of gRPC Python on this machine. The product's upload adds per-chunk sha256 on both sides,
the write to disk, fsync, the whole-shard sha256 check and the catalog update.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent import futures
from pathlib import Path

import grpc
import yaml

from benchmarks._common import ROOT, report, wait_for_port
from orchestrator.auth import token_sha256
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.keys import OwnerKey
from owners.upload import Connection, IngestClient, upload_outbox
from protocol.net import CHUNK_BYTES, free_port
from protocol.proto import ingest_pb2 as pb
from protocol.shards import Manifest
from protocol.task import Task

BARE_METHOD = "/bench.Bare/Send"
TOKEN = "bench-token-0123456789"


def run_bare_server(port: int) -> None:
    """Two methods that only count bytes: raw byte messages, and the product's ShardChunk messages."""
    def send(request_iterator, context):
        return str(sum(len(m) for m in request_iterator)).encode()

    def send_chunks(request_iterator, context):
        return str(sum(len(m.data) for m in request_iterator)).encode()

    handler = grpc.method_handlers_generic_handler("bench.Bare", {
        "Send": grpc.stream_unary_rpc_method_handler(send, request_deserializer=None, response_serializer=None),
        "SendChunks": grpc.stream_unary_rpc_method_handler(send_chunks, request_deserializer=pb.ShardChunk.FromString,
                                                           response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 4 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def bare_upload(port: int, files: list[Path], protobuf: bool) -> None:
    """One stream per file, one file after the other: the plainest way to push the bytes."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 4 << 20)]) as ch:
        if protobuf:
            send = ch.stream_unary(BARE_METHOD + "Chunks", request_serializer=pb.ShardChunk.SerializeToString)
        else:
            send = ch.stream_unary(BARE_METHOD)

        def chunks(path):
            with open(path, "rb") as f:
                while data := f.read(CHUNK_BYTES):
                    yield pb.ShardChunk(data=data, data_crc32=zlib.crc32(data)) if protobuf else data

        for path in files:
            send(chunks(path), timeout=600)


def prepare_outbox(src: Path, work: Path, per_class: int, shard_images: int) -> Path:
    """The first ``per_class`` images of every class of ``src``, encrypted into ``work/outbox``."""
    data = work / "data"
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (data / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (data / cls.name / f.name).symlink_to(f)
    classes = tuple(sorted(p.name for p in data.iterdir()))
    outbox = work / "outbox"
    encrypt_folder(data, outbox, OwnerKey("bench", bytes(range(32))),
                   EncryptSettings(task=Task(classes), shard_images=shard_images), progress=False)
    return outbox


def time_bare(files: list[Path], repeat: int) -> tuple[list[float], list[float]]:
    """Seconds per repeat: raw byte streams, then ShardChunk streams, to a server that only counts."""
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "benchmarks.upload_throughput", "--bare-server", str(port)],
                            stdout=subprocess.DEVNULL, cwd=ROOT)
    bare_times, proto_times = [], []
    try:
        wait_for_port(port, bare)
        for _ in range(repeat):
            t0 = time.perf_counter()
            bare_upload(port, files, protobuf=False)
            bare_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            bare_upload(port, files, protobuf=True)
            proto_times.append(time.perf_counter() - t0)
    finally:
        bare.kill()
        bare.wait()
    return bare_times, proto_times


def time_upload(outbox: Path, work: Path, run: int) -> float:
    """Seconds of one owner-agent upload of ``outbox`` to a fresh ingest service (its own process and store)."""
    manifest = Manifest.load(outbox)
    port = free_port()
    cfg = {"name": "bench", "task": {"classes": list(manifest.classes)},
           "ingest": {"listen": f"127.0.0.1:{port}", "store": str(work / f"store{run}"), "insecure_loopback": True,
                      "owners": [{"id": "bench", "token_sha256": token_sha256(TOKEN)}]}}
    (work / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    log_path = work / f"ingest{run}.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ingest", str(work / "cluster.yaml")],
                                  stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    try:
        wait_for_port(port, server, log=log_path)
        client = IngestClient(Connection(f"127.0.0.1:{port}", TOKEN), log=lambda m: None)
        t0 = time.perf_counter()
        state = upload_outbox(outbox, client, progress=False)
        seconds = time.perf_counter() - t0
        assert state.committed and state.images == manifest.count
        client.close()
    finally:
        server.terminate()
        server.wait(30)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg/train"))
    parser.add_argument("--per-class", type=int, default=5000, help="images per class (default: all 50,000)")
    parser.add_argument("--shard-images", type=int, default=10_000, help="images per shard (CIFAR-10-sized: 10,000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.bare_server:
        return run_bare_server(args.bare_server)

    work = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    try:
        outbox = prepare_outbox(Path(args.data), work, args.per_class, args.shard_images)
        manifest = Manifest.load(outbox)
        files = [outbox / s.name for s in manifest.shards]
        total = sum(s.bytes for s in manifest.shards)
        bare_times, proto_times = time_bare(files, args.repeat)
        ingest_times = [time_upload(outbox, work, i) for i in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bare_best, proto_best, ingest_best = min(bare_times), min(proto_times), min(ingest_times)
    rows = [["bare gRPC stream (raw bytes)", total / bare_best / 1e6, manifest.count / bare_best, 1.0],
            ["bare gRPC stream (ShardChunk messages, CRC-32)", total / proto_best / 1e6, manifest.count / proto_best,
             bare_best / proto_best],
            ["owner-agent upload (verified, stored, committed)", total / ingest_best / 1e6,
             manifest.count / ingest_best, bare_best / ingest_best]]
    report("Upload throughput on loopback", ["path", "MB/s", "images/s", "ratio to bare"], rows,
           [f"{manifest.count} encrypted CIFAR-10 images (32x32, JPEG q85) in {len(files)} shard(s) of "
            f"{args.shard_images} images, {total / 1e6:.1f} MB; {CHUNK_BYTES >> 10} KiB chunks; best of {args.repeat}.",
            f"all seconds: bare {', '.join(f'{t:.2f}' for t in bare_times)}; "
            f"ShardChunk {', '.join(f'{t:.2f}' for t in proto_times)}; "
            f"upload {', '.join(f'{t:.2f}' for t in ingest_times)}",
            "The upload sends 2 shards at once (the agent's default); the bare streams one at a time.",
            "Target (issue): upload >= 0.5 of the bare stream."],
           args.json)


if __name__ == "__main__":
    main()
