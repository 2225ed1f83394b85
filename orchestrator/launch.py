"""``orchestrator launch cluster.yaml``: Ray, ingest, wait for owners, train, evaluate, report, serve.

Each step is a function a test can call alone; :func:`launch` strings them together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlcore.checkpoint import CHECKPOINT_VERSION, code_version, load_checkpoint, model_from_checkpoint
from mlcore.data import EncodedImages, ShardRef, check_shards, shard_refs
from mlcore.loop import evaluate
from orchestrator.config import ClusterConfig, ConfigError, RayConfig
from orchestrator.dashboard_metrics import StoreMetrics
from orchestrator.errors import RunFailed, UploadsMissing
from orchestrator.ingest import IngestService, start_ingest
from orchestrator.status import uploads_missing
from orchestrator.store import ShardStore
from orchestrator.training import TrainJob, make_model, run_training
from protocol.net import is_loopback
from protocol.shards import ShardInfo

# federated: `orchestrator federate`
AVAILABLE_STRATEGIES = ("plain", "shared-key", "pooled", "key-adapters", "per-image-keys")
LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a local node on loopback


def start_ray(cfg: RayConfig, log=print) -> str | None:
    """Join the configured cluster, or start a local Ray with its dashboard. Returns the dashboard URL.

    A local Ray listens on loopback only: its GCS, raylet, object manager, agents and dashboard take
    unauthenticated requests that run code, so nothing else may reach them. Ray binds them to the
    node's IP address; given 127.0.0.1, Ray replaces it with the machine's network address unless it
    believes it runs one machine (``_single_machine_ray``)."""
    import ray

    if cfg.address:
        context = ray.init(address=cfg.address)
    else:
        _single_machine_ray()
        context = ray.init(include_dashboard=True, dashboard_host=cfg.dashboard_host,
                           dashboard_port=cfg.dashboard_port, _node_ip_address=LOOPBACK)
        node_ip = context.address_info.get("node_ip_address", "")
        if not is_loopback(f"{node_ip}:0"):
            ray.shutdown()
            raise RunFailed(f"step 'start Ray': the local Ray took node address {node_ip}, not loopback; it "
                            "would listen on the network. Nothing was started")
    url = context.dashboard_url
    url = f"http://{url}" if url and not url.startswith("http") else url
    log(f"Ray dashboard: {url or '(not available)'}")
    return url


def _single_machine_ray() -> None:
    """Tell Ray this is a one-machine Ray, so that the node address stays 127.0.0.1. Ray reads the
    variable once, when it is first imported; its module constant is set too for a process that
    imported Ray before (e.g. for a Flower simulation)."""
    from ray._private import ray_constants  # private: the one switch Ray offers (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER)

    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def uploads_ready(store: ShardStore, owners: tuple[str, ...]) -> list[str]:
    """What is still missing before training may start (empty when ready)."""
    return uploads_missing(store, owners)


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
    """ShardRefs of every committed dataset in the store that is not quarantined."""
    refs: list[ShardRef] = []
    for d in store.committed_datasets():
        refs += dataset_refs(store, d)
    return refs


def dataset_refs(store: ShardStore, dataset: dict) -> tuple[ShardRef, ...]:
    shards = [ShardInfo(**s) for s in dataset["manifest"]["shards"]]
    return shard_refs(shards, lambda s: store.object_path(s.sha256), dataset["owner"], dataset["key_id"],
                      dataset["split"])


@dataclass
class DataPlan:
    """What trains and is evaluated, and what was left out and why (for the log and the report)."""

    datasets: list[dict]  # committed, not quarantined, not excluded
    exclusions: list[dict] = field(default_factory=list)  # {"owner", "what", "images", "reason"}
    skipped: dict[str, dict] = field(default_factory=dict)  # owner -> {"images", "bad", "reasons"}

    def exclude(self, keep, what, reason, log) -> None:
        """Leave out the datasets ``keep`` says False to; one exclusion (and message) per owner."""
        out = [d for d in self.datasets if not keep(d)]
        self.datasets = [d for d in self.datasets if keep(d)]
        for owner in sorted({d["owner"] for d in out}):
            images = sum(d["images"] for d in out if d["owner"] == owner)
            self.exclusions.append({"owner": owner, "what": what(owner, out), "images": images,
                                    "reason": reason(owner)})
            log(f"excluded from this run: {self.exclusions[-1]['what']} of owner {owner} ({images} images): "
                f"{reason(owner)}")


def select_data(cfg: ClusterConfig, store: ShardStore, log=print) -> DataPlan:
    """The committed datasets this run uses: only owners listed in ingest.owners, none whose data is
    mostly unusable (``training.max_bad_fraction``), and under shared-key only the run's key."""
    plan = DataPlan(store.committed_datasets())
    listed = {o.id for o in cfg.ingest.owners}
    plan.exclude(lambda d: d["owner"] in listed, _all_data, lambda o: "not in ingest.owners of the cluster config",
                 log)
    _exclude_unusable(plan, cfg, store, log)
    if cfg.training.strategy == "shared-key":
        _exclude_other_keys(plan, cfg, log)
    return plan


def _all_data(owner: str, out: list[dict]) -> str:
    splits = sorted({d["split"] for d in out if d["owner"] == owner})
    return f"all data ({', '.join(splits)})"


def _exclude_unusable(plan: DataPlan, cfg: ClusterConfig, store: ShardStore, log) -> None:
    """Read every sample as training will; an owner over the bad fraction is left out entirely, the
    others' unusable samples are skipped (and counted in the report)."""
    limit = cfg.training.max_bad_fraction
    refs = [r for d in plan.datasets for r in dataset_refs(store, d)]
    bad = check_shards(refs, cfg.task)
    declared = {o: sum(r.images for r in refs if r.owner == o) for o in {r.owner for r in refs}}
    over = {o for o in declared if bad.count(o) > limit * declared[o]}

    def why(owner: str) -> str:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in list(bad.reasons(owner).items())[:5])
        return (f"{bad.count(owner)} of {declared[owner]} images unusable "
                f"({bad.count(owner) / max(1, declared[owner]):.1%}, over training.max_bad_fraction {limit:g}): "
                f"{reasons}")

    plan.exclude(lambda d: d["owner"] not in over, _all_data, why, log)
    for owner in sorted(set(declared) - over):
        if bad.count(owner):
            plan.skipped[owner] = {"images": declared[owner], "bad": bad.count(owner), "reasons": bad.reasons(owner)}
            log(f"skipping {bad.count(owner)} unusable of {declared[owner]} images of owner {owner}: "
                f"{', '.join(bad.reasons(owner))}")


def run_key(cfg: ClusterConfig, train: list[dict]) -> str | None:
    """shared-key trains under one key: the first declared in ingest.shared_keys that has train data,
    else the key id of the first train dataset uploaded (the one the ingest service let in first)."""
    declared = [k.key_id for k in cfg.ingest.shared_keys]
    ordered = sorted(train, key=lambda d: d["created"])
    for key in declared:
        if any(d["key_id"] == key for d in ordered):
            return key
    return ordered[0]["key_id"] if ordered else None


def _exclude_other_keys(plan: DataPlan, cfg: ClusterConfig, log) -> None:
    """shared-key: train datasets under another key than the run's are left out, naming their owner
    (test datasets under other keys stay: they measure keys the model never saw)."""
    key = run_key(cfg, [d for d in plan.datasets if d["split"] == "train"])
    if key is None:
        return
    plan.exclude(lambda d: d["split"] != "train" or d["key_id"] == key,
                 lambda o, out: f"train data under key id {', '.join(sorted({d['key_id'] for d in out}))}",
                 lambda o: f"training.strategy shared-key trains under one key, and this run's is {key}", log)


def build_job(cfg: ClusterConfig, store: ShardStore, log=print) -> TrainJob:
    """The training plan: the selected committed train datasets; the selected test datasets to evaluate."""
    s = cfg.training
    if s.strategy not in AVAILABLE_STRATEGIES:
        raise ConfigError("training.strategy 'federated' trains at the owners: run `orchestrator federate` "
                          "with this config (owners join with `owner-agent federate`)")
    plan = select_data(cfg, store, log)
    refs = [r for d in plan.datasets for r in dataset_refs(store, d)]
    train = tuple(r for r in refs if r.split == "train")
    test = tuple(r for r in refs if r.split == "test")
    if not train:
        left_out = "".join(f"; left out {e['owner']}: {e['reason']}" for e in plan.exclusions)
        raise ConfigError(f"no committed train split in the store: nothing to train on{left_out}")
    # The Ray run is named after what it trains on and how: rerunning the same config on the same
    # data resumes it; new uploads or new settings start a new run instead of resuming a stale one.
    how = {k: str(v) for k, v in dataclasses.asdict(s).items() if k not in ("start_when", "wait_timeout_s")}
    # The checkpoint format is part of it: a run never resumes from checkpoints this code cannot read.
    plan_text = json.dumps([sorted((r.path, r.owner, r.key_id or "") for r in train), how, CHECKPOINT_VERSION],
                           sort_keys=True)
    run_name = f"{cfg.name}-{hashlib.sha256(plan_text.encode()).hexdigest()[:10]}"
    job = TrainJob(run_name, cfg.task, train, test, s, str(store.root / "runs" / run_name), code_version(),
                   tuple(plan.exclusions), plan.skipped)
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
            data = EncodedImages(shards, [key], job.task)  # unusable samples skipped, as in training
            if not len(data):
                continue
            result = evaluate(model, data, [key], job.settings, torch.device("cpu"))
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
    lines += data_left_out(job)
    lines += ["", "| epoch | train loss | train acc | test acc (keys trained on) | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {e['epoch']} | {e['train_loss']:.3f} | {e['train_acc']:.1%} | {e.get('test_acc', 0):.1%} | "
              f"{e['images_per_s']:.0f} |" for e in epochs]
    lines += ["", f"checkpoint: {checkpoint}", f"Ray dashboard: {dashboard}", "![curves](curves.png)"]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    doc = {"run": job.run_name, "code_version": job.code_version, "checkpoint": str(checkpoint),
           "training": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(job.settings).items()},
           "task": dataclasses.asdict(job.task), "seen_key_accuracy": seen_acc, "chance": chance,
           "per_owner_key": rows, "excluded": list(job.exclusions), "skipped_samples": job.skipped,
           "epochs": epochs}
    (folder / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(folder / "curves.png", epochs, chance)
    return folder / "report.md"


def data_left_out(job: TrainJob) -> list[str]:
    """report.md's section on data this run did not use: owners or datasets left out, and samples skipped."""
    if not job.exclusions and not job.skipped:
        return []
    lines = ["", "## Data left out", "", "| owner | what | images | why |", "|---|---|---|---|"]
    lines += [f"| {e['owner']} | {e['what']} | {e['images']} | {e['reason']} |" for e in job.exclusions]
    lines += [f"| {owner} | {s['bad']} unusable samples skipped | {s['images']} | "
              f"{'; '.join(f'{n} x {why}' for why, n in s['reasons'].items())} |" for owner, s in job.skipped.items()]
    return lines


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


@contextlib.contextmanager
def step(name: str, logs: Path | str):
    """An unexpected error in one step of a launch ends it as RunFailed naming the step and where to
    look, instead of a bare traceback."""
    try:
        yield
    except (RunFailed, ConfigError):
        raise
    except Exception as exc:
        raise RunFailed(f"step '{name}' failed: {type(exc).__name__}: {str(exc)[:300]}; see {logs}") from exc


def launch(cfg: ClusterConfig, once: bool, stop: threading.Event, log=print) -> Path:
    """Run the whole flow; returns the report path. Serves predictions until ``stop`` unless ``once``."""
    import ray

    from orchestrator.serve import start_serving

    stop_on_signals(stop)
    dashboard = start_ray(cfg.ray, log)
    ingest: IngestService | None = None
    serving = metrics = None
    try:
        ingest = start_ingest(cfg)
        log(f"ingest service on port {ingest.port}; store {ingest.store.root}")
        metrics = StoreMetrics(ingest.store, threading.Event())  # the product's state on Ray's metrics
        metrics.start()
        wait_for_uploads(ingest.store, cfg.training.start_when, cfg.training.wait_timeout_s, stop, log)
        with step("select data", ingest.store.root / "logs"):
            job = build_job(cfg, ingest.store, log)
        log(f"training {job.settings.model} ({job.settings.strategy}) on "
            f"{sum(r.images for r in job.train)} images of {len({r.owner for r in job.train})} owner(s), "
            f"{job.settings.epochs} epochs, {job.settings.workers} worker(s); dashboard {dashboard}")
        checkpoint = run_training(job, ingest.store.root / "ray")
        stop_on_signals(stop)
        with step("evaluate and report", job.log_dir):
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
        if metrics is not None:
            metrics.close()
        if ingest is not None:
            ingest.stop(5)
        ray.shutdown()
