"""The privacy-accuracy frontier: for each strategy x geometry, what the model is worth and what leaks.

    python -m benchmarks.frontier benchmarks/frontier-cpu.yaml           # run the configured cells
    python -m benchmarks.frontier benchmarks/frontier-cpu.yaml --table   # rebuild the table from results.json

One row per cell (geometry, K owners, partition, strategy). Training and evaluation are
``benchmarks.multikey``'s (``run_cell`` / ``federated_cell``): held-out accuracy averaged over the
owners, and the same test images under a key no owner has. The attack columns are the product's
own audit (``owners.audit``, ``owners.attacks``) run on the images the cloud would hold for that
row, scored against the truth:

* ciphertext only at the owner's realistic N: the images one key covers in the row (every
  training image for shared-key; the smallest owner's share for per-owner keys; 1 for per-image
  keys);
* known plaintext with one pair: one plain/encrypted pair, then every other image decrypted with
  the recovered schedule (under per-image keys, the other images have other keys);
* one image at a time: each upload alone (the product's per-image attack).

Gray rows are scored as the audit scores them: the layout is the Y plane's, the verdict takes the
better of the RGB and the Y plane's SSIM (``luma_ssim`` in the record; the table shows RGB SSIM).

Federated rows send no images: the cloud sees trunk updates (the sum only, with SecAgg+), so no
image attack applies. Results accumulate in ``out/results.json`` (one record per cell, its config
and code version); ``only_cells`` runs a subset, ``attacks_only`` fills the attack columns alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import ROOT, machine_facts
from benchmarks.multikey import (
    STRATEGIES,
    ExperimentConfig,
    key_for,
    materialise,
    run_cell,
    split_owners,
    with_overrides,
)
from mlcore.checkpoint import code_version
from mlcore.settings import bounded, range_errors
from orchestrator.config import ConfigError, load_dataclass
from owners.attacks.ciphertext_only import ciphertext_only_attack
from owners.attacks.known_plaintext import known_plaintext_attack
from owners.attacks.luma import luma_figures
from owners.attacks.per_image import per_image_attack
from owners.attacks.prior import NaturalImagePrior
from owners.attacks.scoring import Score, score_attack
from owners.audit import MIN_ATTACKED, AuditError, AuditPlan, as_uploaded, load_images, run_audit, verdict_seen
from owners.cipher import BlockCipher, CipherGeometry
from protocol.task import Task

GEOMETRIES = {  # name -> Task fields
    "color32-b16": {"scheme": "color", "image_size": 32, "block_size": 16},  # the default: 4 blocks
    "color32-b8-444": {"scheme": "color", "image_size": 32, "block_size": 8, "chroma": "444"},  # 16 blocks
    "gray32-b8": {"scheme": "gray", "image_size": 32, "block_size": 8},  # grayscale-based EtC: 48 blocks
    "color64-b16": {"scheme": "color", "image_size": 64, "block_size": 16},  # CIFAR upsampled: 16 blocks
}
PARTITIONS = ("iid", "dirichlet")
FEDERATED = ("federated", "federated-shared-key")
PER_IMAGE = "per-image-keys"
ATTACKS = ("ciphertext only", "known plaintext", "one image at a time")
OWNER_MANAGES = {
    "plain": "nothing (images sent in clear)",
    "shared-key": "one key shared by every owner: distributed to all, kept secret by all",
    "pooled": "its own key",
    "key-adapters": "its own key",
    "federated": "its own key and adapter; trains on its own machine each round",
    "federated-shared-key": "one shared key; trains on its own machine each round",
    PER_IMAGE: "nothing: a fresh key per image, drawn and discarded",
}
COLUMNS = ("geometry", "strategy", "owners", "mean owner accuracy", "wrong-key accuracy",
           "ciphertext only at N: key / SSIM / verdict", "known plaintext, 1 pair: key / SSIM / verdict",
           "one image at a time: key / SSIM / verdict", "the owner manages")


@dataclass(frozen=True)
class CellSpec:
    geometry: str  # a key of GEOMETRIES
    owners: int = bounded(4, 1, 64)  # K
    partition: str = "iid"  # iid | dirichlet
    strategy: str = "shared-key"  # one of benchmarks.multikey.STRATEGIES

    @property
    def name(self) -> str:
        return f"{self.geometry} k{self.owners}-{self.partition} {self.strategy}"


@dataclass(frozen=True)
class StrategyModel:
    """The model (and learning rate) a strategy needs, where it is not the default ConvMixer."""

    strategy: str
    model: str
    lr: float = bounded(0.01, 1e-6, 1.0)


@dataclass(frozen=True)
class FrontierConfig:
    data: Path = ROOT.parent / "shared/data/cifar10-jpeg/train"  # DIR/<class>/*.jpg
    train_per_class: int = bounded(500, 1, 4000)  # the first images of each class, shared among the owners
    test_per_class: int = bounded(100, 1, 500)  # the last images of each class, never trained on
    prior_per_class: int = bounded(200, 1, 400)  # the attacker's public prior: images after the training ones
    model: str = "convmixer_256_8_p4_k9"
    strategy_models: tuple[StrategyModel, ...] = ()  # default: multikey's (per-image-keys: its invariant network)
    multikey_set: tuple[str, ...] = ()  # FIELD=VALUE for benchmarks.multikey's other fields (federated options)
    epochs: int = bounded(4, 1, 1000)
    batch_size: int = bounded(64, 1, 4096)
    lr: float = bounded(0.01, 1e-6, 1.0)
    dirichlet_alpha: float = bounded(0.5, 0.01, 100.0)
    one_at_a_time: int = bounded(20, 0, 1000)  # images attacked one at a time (and pairs scored per-image)
    seed: int = bounded(0, 0, 2**31 - 1)
    cells: tuple[CellSpec, ...] = ()
    only_cells: tuple[str, ...] = ()  # cell names (CellSpec.name) to run now; empty: every cell
    attacks_only: bool = False  # fill the attack columns and skip training
    out: Path = ROOT / "results" / "frontier"


def check_config(cfg: FrontierConfig) -> None:
    """Every cell names a known geometry, partition and strategy; numbers in range."""
    errors = range_errors(cfg)
    for i, cell in enumerate(cfg.cells):
        where = f"cells[{i}]"
        errors += range_errors(cell, f"{where}.")
        if cell.geometry not in GEOMETRIES:
            errors.append(f"{where}.geometry: {cell.geometry!r} is not one of {', '.join(GEOMETRIES)}")
        if cell.partition not in PARTITIONS:
            errors.append(f"{where}.partition: {cell.partition!r} is not one of {', '.join(PARTITIONS)}")
        if cell.strategy not in (*STRATEGIES, PER_IMAGE):
            errors.append(f"{where}.strategy: {cell.strategy!r} is not one of {', '.join(STRATEGIES)}, {PER_IMAGE}")
        elif cell.strategy not in STRATEGIES and not cfg.attacks_only and _selected(cfg, cell):
            errors.append(f"{where}.strategy: {cell.strategy!r} cannot train yet (benchmarks.multikey has "
                          f"{', '.join(STRATEGIES)}); attacks_only: true measures its attack columns")
    for i, sm in enumerate(cfg.strategy_models):
        errors += range_errors(sm, f"strategy_models[{i}].")
    names = {c.name for c in cfg.cells}
    errors += [f"only_cells: {n!r} is not a configured cell" for n in cfg.only_cells if n not in names]
    for cell in cfg.cells:
        experiment_for(cfg, cell)  # a bad multikey_set entry stops here, naming the field
    if not cfg.cells:
        errors.append("cells: no cell configured")
    if errors:
        raise ConfigError("; ".join(errors))


def _selected(cfg: FrontierConfig, cell: CellSpec) -> bool:
    return not cfg.only_cells or cell.name in cfg.only_cells


def experiment_for(cfg: FrontierConfig, cell: CellSpec) -> ExperimentConfig:
    """multikey's config for one cell: the budget here, every other field (federated rounds, adapters)
    at multikey's defaults of the day (recorded with the cell)."""
    exp = with_overrides(ExperimentConfig(), list(cfg.multikey_set))
    exp = dataclasses.replace(exp, data=cfg.data, train_per_class=cfg.train_per_class,
                              test_per_class=cfg.test_per_class, owners=(cell.owners,), partitions=(cell.partition,),
                              dirichlet_alpha=cfg.dirichlet_alpha, strategies=(cell.strategy,), model=cfg.model,
                              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, out=cfg.out)
    for sm in cfg.strategy_models:
        if sm.strategy == cell.strategy == PER_IMAGE:  # multikey keeps the per-image network in fields of its own
            exp = dataclasses.replace(exp, per_image_model=sm.model, per_image_lr=sm.lr)
        elif sm.strategy == cell.strategy:
            exp = dataclasses.replace(exp, model=sm.model, lr=sm.lr)
    return exp


def owner_shares(cfg: FrontierConfig, files: dict[str, list[Path]], cell: CellSpec) -> list[dict[str, list[Path]]]:
    """The cell's split among its owners: the same for every strategy and geometry of one K/partition."""
    rng = random.Random(f"frontier/{cfg.seed}/{cell.owners}/{cell.partition}")
    return split_owners(files, cell.owners, cell.partition, cfg.dirichlet_alpha, rng)


# --------------------------------------------------------------------------- attack columns


def attack_columns(cell: CellSpec, shares, prior_dir: Path, cfg: FrontierConfig, work: Path) -> dict:
    """The product's attacks on what the cloud would hold for this row: attack -> result dict."""
    task = Task(("x",), **GEOMETRIES[cell.geometry])
    geometry = CipherGeometry.for_task(task)
    if cell.strategy in FEDERATED:
        return {"ciphertext only": {"note": "images never leave the owner: the cloud sees trunk updates (only "
                                            "their sum with SecAgg+)"},
                "known plaintext": {"note": "no images sent"}, "one image at a time": {"note": "no images sent"}}
    if cell.strategy == "plain":
        return {attack: {"note": "images sent in clear"} for attack in ATTACKS}
    if cell.strategy == PER_IMAGE:
        count = cfg.one_at_a_time + 1  # one known pair, the rest attacked
        images = load_images(_folder(work / "attacked", shares[0]), geometry.height, max(count, MIN_ATTACKED + 2))
        images = images[:count]
        prior = NaturalImagePrior.from_images(load_images(prior_dir, geometry.height, 10 * cfg.prior_per_class))
        return per_image_key_attacks(images, prior, geometry, task, cfg.seed)
    if cell.strategy == "shared-key":
        owner = {c: [p for share in shares for p in share[c]] for c in shares[0]}  # one key covers every image
        secret = key_for("shared", cfg.seed).secret
    else:  # a key per owner: the least evidence any one key leaves is the smallest owner's share
        sizes = [sum(map(len, s.values())) for s in shares]
        smallest = min((i for i in range(len(shares)) if sizes[i]), key=sizes.__getitem__)
        owner, secret = shares[smallest], key_for(f"owner{smallest}", cfg.seed).secret
    n = sum(map(len, owner.values()))
    plan = AuditPlan(counts=(n,), pairs=(1,), per_image=cfg.one_at_a_time, limit=n)
    try:
        report = run_audit(_folder(work / "attacked", owner), secret, geometry, task.codec, plan, prior_data=prior_dir)
    except AuditError as exc:
        return {"note": f"not measured: {exc}"}
    return {row.attack: _result(row.score, row.images, row.scored, row.seconds, row.luma_ssim) for row in report.rows}


def per_image_key_attacks(images: np.ndarray, prior: NaturalImagePrior, geometry: CipherGeometry, task: Task,
                          seed: int) -> dict:
    """The same attacks when every image has its own key: nothing pools, a pair reveals one image's key."""
    ciphers = [BlockCipher(key_for(f"image{i}", seed).secret, geometry) for i in range(len(images))]
    stored = np.concatenate([as_uploaded(c, task.codec, images[i:i + 1]) for i, c in enumerate(ciphers)])

    def scored(estimates, indices) -> tuple[list[Score], tuple[float | None, float] | None]:
        """Each estimate against its image's own key; gray: the Y plane's layout and SSIM too, as the audit."""
        scores = [score_attack(e, ciphers[i].schedule, geometry, stored[i:i + 1], images[i:i + 1])
                  for e, i in zip(estimates, indices)]
        if geometry.scheme != "gray":
            return scores, None
        rows = list(indices)
        return scores, luma_figures(list(estimates), [ciphers[i].schedule for i in rows], geometry, stored[rows],
                                    images[rows])

    others = range(1, len(images))
    started = time.perf_counter()
    alone = [ciphertext_only_attack(stored[i:i + 1], geometry, prior) for i in others]
    out = {"ciphertext only": _mean(*scored(alone, others), 1, time.perf_counter() - started)}
    started = time.perf_counter()
    pair = known_plaintext_attack(images[:1], stored[:1], geometry)  # image 0's key, tried on every other image
    out["known plaintext"] = _mean(*scored([pair] * len(others), others), 1, time.perf_counter() - started)
    started = time.perf_counter()
    out["one image at a time"] = _mean(*scored(per_image_attack(stored[1:], geometry, prior), others), 1,
                                       time.perf_counter() - started)
    return out


def _mean(scores: list[Score], luma: tuple[float | None, float] | None, held: int, seconds: float) -> dict:
    """``luma``: the gray scheme's Y-plane (layout, SSIM), which stand for the layout and count for the verdict."""
    fields = ("key", "position", "orientation", "negate", "exact", "exact_up_to_flip", "ssim", "psnr")
    mean = {f: float(np.mean([getattr(s, f) for s in scores])) for f in fields}
    layout = [s.arrangement for s in scores if s.arrangement is not None]
    arrangement = luma[0] if luma is not None else float(np.mean(layout)) if layout else None
    score = Score(**mean, channels=None, mirrored=False, arrangement=arrangement)
    return _result(score, held, len(scores), seconds / max(1, len(scores)), None if luma is None else luma[1])


def _result(score: Score, held: int, scored: int, seconds: float, luma_ssim: float | None = None) -> dict:
    """gray (``luma_ssim``, the Y plane's SSIM): the verdict takes the better SSIM, as the audit's does."""
    luma = {} if luma_ssim is None else {"luma_ssim": round(luma_ssim, 4)}
    return {"images": held, "scored": scored, "seconds": round(seconds, 3), "verdict": verdict_seen(score, luma_ssim),
            **score.as_dict(), **luma}


def _folder(path: Path, share: dict[str, list[Path]]) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    materialise(share, path)
    return path


# --------------------------------------------------------------------------- the table


def attack_text(record: dict, attack: str) -> str:
    attacks = record.get("attacks")
    if attacks is None:
        return "not run"
    r = attacks.get(attack)
    if r is None:
        return "not measured in this record (it predates the attack)"
    if "note" in r:
        return r["note"]
    held = f" (N = {r['images']:,})" if attack == "ciphertext only" else ""
    return f"{r['key']:.0%} / {r['ssim']:.2f} / {r['verdict']}{held}"


def row_cells(record: dict) -> list[str]:
    cell = record["cell"]
    training = record.get("training")
    if training is None:
        accuracy = wrong = "not run"
    else:
        accuracy = f"{training['accuracy']:.1%}"
        wrong = "-" if training["wrong_key_accuracy"] is None else f"{training['wrong_key_accuracy']:.1%}"
        if training.get("wrong_key_refused"):
            wrong = f"refused; {wrong} under owner0's key id"
    return [cell["geometry"], cell["strategy"], f"K = {cell['owners']} {cell['partition']}", accuracy, wrong,
            *(attack_text(record, a) for a in ATTACKS), OWNER_MANAGES.get(cell["strategy"], "-")]


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in records]
    return "\n".join(lines)


def cell_order(record: dict) -> tuple:
    c = record["cell"]
    strategies = (*STRATEGIES, PER_IMAGE)
    return (list(GEOMETRIES).index(c["geometry"]) if c["geometry"] in GEOMETRIES else 99, c["owners"],
            c["partition"] != "iid", strategies.index(c["strategy"]) if c["strategy"] in strategies else 99)


def write_outputs(out: Path, update: dict | None = None) -> list[dict]:
    """Merge ``update`` (a cell's record) into out/results.json; rewrite results.md from every record."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    records = json.loads(path.read_text())["results"] if path.exists() else []
    if update is not None:
        earlier = next((r for r in records if r["name"] == update["name"]), {})
        records = [r for r in records if r["name"] != update["name"]] + [{**earlier, **update}]
    records.sort(key=cell_order)
    path.write_text(json.dumps({"machine": machine_facts(), "results": records}, indent=1) + "\n")
    (out / "results.md").write_text(f"# The privacy-accuracy frontier\n\n{table(records)}\n")
    return records


# --------------------------------------------------------------------------- running cells


def run(cfg: FrontierConfig) -> None:
    import ray

    classes = tuple(sorted(p.name for p in Path(cfg.data).iterdir() if p.is_dir()))
    all_files = {c: sorted((Path(cfg.data) / c).iterdir()) for c in classes}
    train_files = {c: f[:cfg.train_per_class] for c, f in all_files.items()}
    prior_files = {c: f[cfg.train_per_class:cfg.train_per_class + cfg.prior_per_class] for c, f in all_files.items()}
    test_files = {c: f[-cfg.test_per_class:] for c, f in all_files.items()}
    if any(set(prior_files[c]) & set(test_files[c]) for c in classes):
        raise ConfigError(f"{cfg.data}: too few images per class for training, prior and test images apart")
    work = Path(tempfile.mkdtemp(prefix="frontier-"))
    prior_dir, test_dir = work / "prior-imgs", work / "test-imgs"
    materialise(prior_files, prior_dir)
    materialise(test_files, test_dir)
    cells = [c for c in cfg.cells if _selected(cfg, c)]
    version = code_version()  # the commit this process loaded its code from (HEAD may move while it runs)
    if not cfg.attacks_only:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for cell in cells:
            shares = owner_shares(cfg, train_files, cell)
            record = {"name": cell.name, "cell": dataclasses.asdict(cell), "geometry": GEOMETRIES[cell.geometry],
                      "owner_images": [sum(map(len, s.values())) for s in shares],
                      "attacks": attack_columns(cell, shares, prior_dir, cfg, work),
                      "attacks_code_version": version,
                      "attack_config": {"prior_per_class": cfg.prior_per_class, "one_at_a_time": cfg.one_at_a_time}}
            write_outputs(cfg.out, record)
            print(f"{cell.name}: attacks {[attack_text(record, a) for a in ATTACKS]}", flush=True)
            if cfg.attacks_only:
                continue
            exp = experiment_for(cfg, cell)
            folder = work / cell.geometry
            folder.mkdir(exist_ok=True)
            result = run_cell(exp, cell.owners, cell.partition, cell.strategy, shares, test_dir, classes, folder,
                              GEOMETRIES[cell.geometry])
            record.update(training=result, code_version=version, config=_jsonable(exp))
            write_outputs(cfg.out, record)
            print(f"{cell.name}: {result['accuracy']:.1%} in {result['minutes']:.1f} min", flush=True)
    finally:
        if not cfg.attacks_only:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _jsonable(cfg) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="frontier YAML (fields of FrontierConfig)")
    parser.add_argument("--table", action="store_true", help="only rebuild results.md from results.json")
    parser.add_argument("--only", action="append", metavar="CELL",
                        help="run this cell (e.g. 'gray32-b8 k4-iid shared-key'; repeatable): overrides only_cells")
    parser.add_argument("--attacks-only", action="store_true", help="fill the attack columns, train nothing")
    args = parser.parse_args()
    cfg = load_dataclass(FrontierConfig, args.config)
    cfg = dataclasses.replace(cfg, only_cells=tuple(args.only or cfg.only_cells),
                              attacks_only=args.attacks_only or cfg.attacks_only)
    check_config(cfg)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no telemetry: Flower reads this on first import
    if not args.table:
        run(cfg)
    print(table(write_outputs(cfg.out)))
    print(f"wrote {cfg.out / 'results.md'} and results.json")


if __name__ == "__main__":
    main()
