"""``orchestrator status cluster.yaml``: what the cloud holds and does, read from the store alone
(no Ray, no torch: it answers while a launch runs, and on a machine with only the store mounted).

Owners and their data come from the catalog; runs from ``<store>/<name>/runs/<run>/``, where
training appends ``metrics.jsonl`` every epoch and the launch writes ``report/report.json`` at the
end. A run without a report is either training or was stopped; the age of its last metrics line
tells which (a live run writes one every epoch).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from orchestrator.config import ClusterConfig
from orchestrator.store import ShardStore
from protocol.task import SPLITS


def uploads_missing(store: ShardStore, owners: tuple[str, ...]) -> list[str]:
    """``owner split`` for each train or test split of ``owners`` not yet committed (empty: ready)."""
    done = {(d["owner"], d["split"]) for d in store.committed_datasets()}
    return [f"{o} {split}" for o in owners for split in SPLITS if (o, split) not in done]


def owner_rows(cfg: ClusterConfig, datasets: list[dict]) -> list[dict]:
    """One row per owner in the config, and per owner with data but no longer in it."""
    listed = [o.id for o in cfg.ingest.owners]
    names = listed + sorted({d["owner"] for d in datasets} - set(listed))
    rows = []
    for owner in names:
        mine = [d for d in datasets if d["owner"] == owner]
        usable = [d for d in mine if d["committed"] and not d["quarantined"]]
        rows.append({"owner": owner, "in_config": owner in listed, "datasets": len(mine),
                     **{f"{split}_images": sum(d["images"] for d in usable if d["split"] == split) for split in SPLITS},
                     "key_ids": sorted({d["key_id"] for d in mine if d["key_id"]}),
                     "quarantined": sum(1 for d in mine if d["quarantined"]),
                     "last_upload": max((d["created"] for d in mine), default=None)})
    return rows


def run_row(folder: Path) -> dict:
    """A run's state, epoch and accuracy from its files."""
    report = folder / "report" / "report.json"
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    epochs = [json.loads(line) for line in lines if line.strip()]
    last = max(epochs, key=lambda e: e.get("epoch", -1), default={})
    row = {"run": folder.name, "epoch": last.get("epoch"), "test_acc": last.get("test_acc"),
           "last_update": metrics.stat().st_mtime if metrics.is_file() else None, "report": None}
    if report.is_file():
        doc = json.loads(report.read_text())
        row.update(state="finished", report=str(report.with_name("report.md")), test_acc=doc.get("seen_key_accuracy"),
                   excluded=[e["owner"] for e in doc.get("excluded", [])])
    else:
        row["state"] = "training or stopped" if epochs else "starting or stopped"
    return row


def cloud_status(cfg: ClusterConfig, store: ShardStore) -> dict:
    """Everything ``orchestrator status`` shows, JSON-ready."""
    runs_dir = store.root / "runs"
    runs = [run_row(f) for f in sorted(runs_dir.iterdir(), key=lambda f: f.stat().st_mtime)] \
        if runs_dir.is_dir() else []
    return {"name": cfg.name, "store": str(store.root), "strategy": cfg.training.strategy, "now": time.time(),
            "owners": owner_rows(cfg, store.datasets()), "datasets": store.datasets(), "runs": runs,
            "waiting_for": uploads_missing(store, cfg.training.start_when)}
