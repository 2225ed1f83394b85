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
import time
from pathlib import Path

from orchestrator import __version__
from orchestrator.config import ConfigError, load_config
from orchestrator.errors import Refused, RunFailed


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(f"{args.config}: valid. run {cfg.name!r}, strategy {cfg.training.strategy}, "
          f"{len(cfg.ingest.owners)} owner(s), task:", file=sys.stderr)
    print(json.dumps(dataclasses.asdict(cfg.task), indent=1))
    from orchestrator.config import privacy_warning  # the owners' verdict on this task's cipher, same words

    warning = privacy_warning(cfg.task)
    if warning:
        print(warning, file=sys.stderr)
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


def open_store(cfg):
    """The run's store, which must exist (a typo in the config must not create an empty one)."""
    from orchestrator.store import ShardStore  # sqlite only; no Ray, no torch

    root = Path(cfg.ingest.store) / cfg.name
    if not (root / "catalog.sqlite").is_file():
        raise ConfigError(f"ingest.store: no store of run {cfg.name!r} at {root} (nothing uploaded yet?)")
    return ShardStore(root, cfg.task, cfg.ingest.max_shard_bytes)


def cmd_datasets(args: argparse.Namespace) -> int:
    store = open_store(load_config(args.config))
    try:
        if args.action == "list":
            print_datasets(store.datasets())
        elif args.action in ("quarantine", "release"):
            ids = getattr(store, args.action)(args.owner, args.dataset)
            what = f"dataset {ids[0]}" if args.dataset else f"all {len(ids)} dataset(s), and later uploads"
            verb = "quarantined (kept on disk, not trained on or served)" if args.action == "quarantine" else "released"
            print(f"owner {args.owner}: {what} {verb}", file=sys.stderr)
        elif not args.yes:
            prefix = args.dataset or ""
            chosen = [d for d in store.datasets() if d["owner"] == args.owner and d["id"].startswith(prefix)]
            print_datasets(chosen)
            raise ConfigError(f"remove deletes these {len(chosen)} dataset(s) of {args.owner} for good: add --yes")
        else:
            removed = store.remove(args.owner, args.dataset)
            print(f"owner {args.owner}: removed {len(removed.datasets)} dataset(s), {removed.objects} object file(s) "
                  f"({removed.bytes} bytes) no other owner holds, {removed.partial_files} partial upload(s)",
                  file=sys.stderr)
    finally:
        store.close()
    return 0


def print_datasets(rows: list[dict]) -> None:
    header = ("owner", "dataset id", "split", "key id", "images", "committed", "quarantined", "bytes")
    print_table(header, [(d["owner"], d["id"], d["split"], d["key_id"] or "-", str(d["images"]),
                          "yes" if d["committed"] else "no", "yes" if d["quarantined"] else "no", str(d["bytes"]))
                         for d in rows])


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.status import cloud_status

    cfg = load_config(args.config)
    store = open_store(cfg)
    try:
        status = cloud_status(cfg, store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"run {status['name']} ({status['strategy']}), store {status['store']}")
    print_table(("owner", "in config", "datasets", "train images", "test images", "key ids", "quarantined",
                 "last upload"),
                [(o["owner"], "yes" if o["in_config"] else "NO", str(o["datasets"]), str(o["train_images"]),
                  str(o["test_images"]), ",".join(o["key_ids"]) or "-", str(o["quarantined"]), _when(o["last_upload"]))
                 for o in status["owners"]])
    print()
    print_datasets(status["datasets"])
    print()
    print_table(("run", "state", "epoch", "accuracy", "last update", "report"),
                [(r["run"], r["state"], str(r["epoch"] or "-"), f"{r['test_acc']:.1%}" if r["test_acc"] is not None
                  else "-", _when(r["last_update"]), r["report"] or "-") for r in status["runs"]])
    if status["waiting_for"]:
        print(f"\ntraining waits for: {', '.join(status['waiting_for'])} (training.start_when)")
    return 0


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


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
    p = sub.add_parser("datasets", help="list, quarantine, release or remove owners' datasets in the store")
    p.add_argument("config")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every dataset: owner, id, split, key id, images, state, bytes")
    for action, text in (("quarantine", "keep on disk but out of training and predictions (reversible)"),
                         ("release", "undo quarantine"),
                         ("remove", "delete catalog rows, objects no other owner holds, partial uploads")):
        a = actions.add_parser(action, help=text)
        a.add_argument("owner")
        a.add_argument("--dataset", metavar="ID", help="only this dataset (its id or a unique prefix of 8+ digits)")
        if action == "remove":
            a.add_argument("--yes", action="store_true", help="really delete (without it: show what would go)")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("status", help="owners, datasets, runs and what training waits for (from the store)")
    p.add_argument("config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("hash-token", help="read an owner token on stdin, print the token_sha256 for cluster.yaml")
    p.set_defaults(func=cmd_hash_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A privacy product sends no telemetry: Flower reads this when it is first imported.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return args.func(args)
    except (ConfigError, RunFailed, Refused) as exc:
        print(f"orchestrator {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
