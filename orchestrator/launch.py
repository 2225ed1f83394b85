"""``orchestrator launch cluster.yaml``: Ray, ingest, wait for owners, train, evaluate, report, serve.

Each step is a function a test can call alone; :func:`launch` strings them together.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
import time
from pathlib import Path

from mlcore.checkpoint import CHECKPOINT_VERSION, code_version, load_checkpoint, model_from_checkpoint
from mlcore.data import EncodedImages, ShardRef, group_names, shard_refs
from mlcore.loop import evaluate
from orchestrator.config import ClusterConfig, ConfigError, RayConfig
from orchestrator.errors import UploadsMissing
from orchestrator.ingest import IngestService, start_ingest
from orchestrator.store import ShardStore
from orchestrator.training import TrainJob, make_model, run_training
from protocol.shards import ShardInfo
from protocol.task import SPLITS

AVAILABLE_STRATEGIES = ("plain", "shared-key", "pooled", "key-adapters")  # federated: `orchestrator federate`


def start_ray(cfg: RayConfig, log=print) -> str | None:
    """Join the configured cluster, or start a local Ray with its dashboard. Returns the dashboard URL."""
    import ray

    if cfg.address:
        context = ray.init(address=cfg.address)
    else:
        context = ray.init(include_dashboard=True, dashboard_host=cfg.dashboard_host,
                           dashboard_port=cfg.dashboard_port)
    url = context.dashboard_url
    url = f"http://{url}" if url and not url.startswith("http") else url
    log(f"Ray dashboard: {url or '(not available)'}")
    return url


def uploads_ready(store: ShardStore, owners: tuple[str, ...]) -> list[str]:
    """What is still missing before training may start (empty when ready)."""
    done = {(d["owner"], d["split"]) for d in store.committed_datasets()}
    return [f"{o} {split}" for o in owners for split in SPLITS if (o, split) not in done]


def wait_for_uploads(store: ShardStore, owners: tuple[str, ...], timeout_s: float, stop: threading.Event,
                     log=print, poll_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while missing := uploads_ready(store, owners):
        if missing != last:
            log(f"waiting for uploads: {', '.join(missing)}")
            last = missing
        if time.monotonic() > deadline:
            raise UploadsMissing(f"gave up after {timeout_s:.0f} s (training.wait_timeout_s) waiting for "
                               f"uploads: {', '.join(missing)} not committed")
        if stop.wait(poll_s):
            raise KeyboardInterrupt
    log(f"uploads complete for {', '.join(owners) or 'every owner'}")


def committed_refs(store: ShardStore) -> list[ShardRef]:
    """ShardRefs of every committed dataset in the store."""
    refs: list[ShardRef] = []
    for d in store.committed_datasets():
        shards = [ShardInfo(**s) for s in d["manifest"]["shards"]]
        refs += shard_refs(shards, lambda s: store.object_path(s.sha256), d["owner"], d["key_id"], d["split"])
    return refs


def build_job(cfg: ClusterConfig, store: ShardStore) -> TrainJob:
    """The training plan: every committed train dataset; every committed test dataset to evaluate."""
    s = cfg.training
    if s.strategy not in AVAILABLE_STRATEGIES:
        raise ConfigError("training.strategy 'federated' trains at the owners: run `orchestrator federate` "
                          "with this config (owners join with `owner-agent federate`)")
    refs = committed_refs(store)
    train = tuple(r for r in refs if r.split == "train")
    test = tuple(r for r in refs if r.split == "test")
    if not train:
        raise ConfigError("no committed train split in the store: nothing to train on")
    keys = group_names(list(train))
    if s.strategy == "shared-key" and len(keys) > 1:
        raise ConfigError(f"training.strategy 'shared-key' expects one key, but the train splits use "
                          f"{len(keys)} key ids ({', '.join(keys)}); use 'pooled' or re-encrypt with one key")
    # The Ray run is named after what it trains on and how: rerunning the same config on the same
    # data resumes it; new uploads or new settings start a new run instead of resuming a stale one.
    how = {k: str(v) for k, v in dataclasses.asdict(s).items() if k not in ("start_when", "wait_timeout_s")}
    # The checkpoint format is part of it: a run never resumes from checkpoints this code cannot read.
    plan = json.dumps([sorted((r.path, r.owner, r.key_id or "") for r in train), how, CHECKPOINT_VERSION],
                      sort_keys=True)
    run_name = f"{cfg.name}-{hashlib.sha256(plan.encode()).hexdigest()[:10]}"
    job = TrainJob(run_name, cfg.task, train, test, s, str(store.root / "runs" / run_name), code_version())
    make_model(job)  # a bad model/geometry combination fails here, before Ray starts workers
    return job


def evaluate_checkpoint(checkpoint: Path, job: TrainJob) -> list[dict]:
    """Accuracy per (owner, key id) test dataset, including keys the model never saw."""
    import torch

    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload)
    trained = set(payload["key_ids"]) | {r.owner for r in job.train if r.key_id is None}
    rows = []
    for owner in sorted({r.owner for r in job.test}):
        for key in sorted({r.key_id or r.owner for r in job.test if r.owner == owner}):
            shards = [r for r in job.test if r.owner == owner and (r.key_id or r.owner) == key]
            result = evaluate(model, EncodedImages(shards, [key]), [key], job.settings, torch.device("cpu"))
            group = result["per_group"][key]
            rows.append({"owner": owner, "key_id": key if job.task.encrypted else None,
                         "seen_in_training": key in trained, "images": group["images"],
                         "accuracy": group["acc"], "refused": group["refused"]})
    return rows


def write_report(folder: Path, job: TrainJob, checkpoint: Path, rows: list[dict], dashboard: str | None) -> Path:
    """report.md (table), report.json (everything), curves.png (per-epoch metrics)."""
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [json.loads(line) for line in (Path(job.log_dir) / "metrics.jsonl").read_text().splitlines()]
    final = {}
    for e in epochs:  # reruns append; keep the last record of each epoch
        final[e["epoch"]] = e
    epochs = [final[k] for k in sorted(final)]
    chance = 1 / len(job.task.classes)
    seen = [r for r in rows if r["seen_in_training"] and not r["refused"]]
    seen_acc = sum(r["accuracy"] * r["images"] for r in seen) / max(1, sum(r["images"] for r in seen))
    lines = [f"# Run {job.run_name}", "",
             f"model {job.settings.model}, strategy {job.settings.strategy}, scheme {job.task.scheme}, "
             f"{job.settings.epochs} epochs, code {job.code_version}", "",
             f"test accuracy on keys seen in training: **{seen_acc:.1%}** (chance {chance:.0%})", "",
             "| owner | key id | seen in training | test images | accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['owner']} | {r['key_id'] or '-'} | {'yes' if r['seen_in_training'] else 'NO'} | {r['images']} "
              f"| {'refused (no adapter for this key)' if r['refused'] else format(r['accuracy'], '.1%')} |"
              for r in rows]
    lines += ["", "| epoch | train loss | train acc | test acc (keys trained on) | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {e['epoch']} | {e['train_loss']:.3f} | {e['train_acc']:.1%} | {e.get('test_acc', 0):.1%} | "
              f"{e['images_per_s']:.0f} |" for e in epochs]
    lines += ["", f"checkpoint: {checkpoint}", f"Ray dashboard: {dashboard}", "![curves](curves.png)"]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    doc = {"run": job.run_name, "code_version": job.code_version, "checkpoint": str(checkpoint),
           "training": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(job.settings).items()},
           "task": dataclasses.asdict(job.task), "seen_key_accuracy": seen_acc, "chance": chance,
           "per_owner_key": rows, "epochs": epochs}
    (folder / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(folder / "curves.png", epochs, chance)
    return folder / "report.md"


def _plot(path: Path, epochs: list[dict], chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(x, [e["train_loss"] for e in epochs], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss")
    ax2.plot(x, [e["train_acc"] for e in epochs], marker="o", label="train")
    ax2.plot(x, [e.get("test_acc", 0) for e in epochs], marker="o", label="test (keys trained on)")
    if any("test_acc_unseen_keys" in e for e in epochs):
        ax2.plot(x, [e.get("test_acc_unseen_keys", 0) for e in epochs], marker="o", label="test (keys never seen)")
    ax2.axhline(chance, color="grey", linestyle=":", label="chance")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM set ``stop``. Called again after training: Ray Train's fit() installs its own
    SIGINT handler and leaves it in place."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())


def launch(cfg: ClusterConfig, once: bool, stop: threading.Event, log=print) -> Path:
    """Run the whole flow; returns the report path. Serves predictions until ``stop`` unless ``once``."""
    import ray

    from orchestrator.serve import start_serving

    stop_on_signals(stop)
    dashboard = start_ray(cfg.ray, log)
    ingest: IngestService | None = None
    serving = None
    try:
        ingest = start_ingest(cfg)
        log(f"ingest service on port {ingest.port}; store {ingest.store.root}")
        wait_for_uploads(ingest.store, cfg.training.start_when, cfg.training.wait_timeout_s, stop, log)
        job = build_job(cfg, ingest.store)
        log(f"training {job.settings.model} ({job.settings.strategy}) on "
            f"{sum(r.images for r in job.train)} images of {len({r.owner for r in job.train})} owner(s), "
            f"{job.settings.epochs} epochs, {job.settings.workers} worker(s); dashboard {dashboard}")
        checkpoint = run_training(job, ingest.store.root / "ray")
        stop_on_signals(stop)
        rows = evaluate_checkpoint(checkpoint, job)
        report = write_report(Path(job.log_dir) / "report", job, checkpoint, rows, dashboard)
        log(report.read_text())
        log(f"report: {report}")
        if once:
            return report
        serving = start_serving(cfg, checkpoint, ingest.store.key_ids_of)
        log(f"prediction service on port {serving.port}; Ctrl-C stops")
        stop.wait()
        return report
    finally:
        if serving is not None:
            serving.stop(5)
        if ingest is not None:
            ingest.stop(5)
        ray.shutdown()
