"""``orchestrator``: the cloud side's command. Thin: parse, call, print."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import threading

from orchestrator import __version__
from orchestrator.config import ConfigError, load_config
from orchestrator.errors import RunFailed


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(f"{args.config}: valid. run {cfg.name!r}, strategy {cfg.training.strategy}, "
          f"{len(cfg.ingest.owners)} owner(s), task:", file=sys.stderr)
    print(json.dumps(dataclasses.asdict(cfg.task), indent=1))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from orchestrator.ingest import start_ingest  # grpc is only needed here

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = load_config(args.config)
    service = start_ingest(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"ingest service for {cfg.name!r} on port {service.port}; store {service.store.root}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    stop.wait()
    service.stop(grace=5)
    print("ingest service stopped", file=sys.stderr)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.launch import launch  # ray and torch are only needed here

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = load_config(args.config)
    launch(cfg, once=args.once, stop=threading.Event(), log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from orchestrator.federate import run_federation
    from orchestrator.ingest import start_ingest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = load_config(args.config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service = start_ingest(cfg)  # owners fetch the task (and authenticate) here
    try:
        work = service.store.root / "federated" / cfg.name
        print(f"task service on port {service.port}; Flower server on {cfg.federated.listen}; work folder {work}",
              file=sys.stderr, flush=True)
        checkpoint = run_federation(cfg, work, stop, log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        service.stop(grace=5)
    print(json.dumps({"trunk_checkpoint": str(checkpoint), "metrics": str(checkpoint.parent / "metrics.jsonl")}))
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        raise ConfigError("no token on stdin")
    print(hashlib.sha256(token.encode("utf-8")).hexdigest())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Cloud side: ingest, Ray training, prediction.")
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check", help="validate a cluster.yaml and print the task owners will receive")
    p.add_argument("config")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("ingest", help="run only the ingest service of a cluster.yaml (owners upload here)")
    p.add_argument("config")
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("launch", help="Ray + ingest; train when the owners' data is in; evaluate; serve predictions")
    p.add_argument("config")
    p.add_argument("--once", action="store_true", help="exit after the report instead of serving predictions")
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("federate", help="federated training with Flower: owners train at home, FedAvg on the trunk")
    p.add_argument("config")
    p.set_defaults(func=cmd_federate)
    p = sub.add_parser("hash-token", help="read an owner token on stdin, print the token_sha256 for cluster.yaml")
    p.set_defaults(func=cmd_hash_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A privacy product sends no telemetry: Flower reads this when it is first imported.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return args.func(args)
    except (ConfigError, RunFailed) as exc:
        print(f"orchestrator {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
