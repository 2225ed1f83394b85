"""The frontier table: its columns, its row labels and the attack columns, on a tiny synthetic set
(the product's attacks run for real; no training)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.frontier import (
    ATTACKS,
    COLUMNS,
    GEOMETRIES,
    OWNER_MANAGES,
    CellSpec,
    FrontierConfig,
    attack_columns,
    check_config,
    table,
    write_outputs,
)
from orchestrator.config import ConfigError
from owners.audit import VERDICTS

CLASSES = ("cat", "dog")


def _images(folder, per_class: int, seed: int) -> dict:
    """Smooth random colour images (4x4 noise upsampled): borders and colours that continue."""
    rng = np.random.default_rng(seed)
    files = {}
    for cls in CLASSES:
        (folder / cls).mkdir(parents=True)
        files[cls] = []
        for i in range(per_class):
            small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            path = folder / cls / f"{i}.jpg"
            small.resize((32, 32), Image.Resampling.BICUBIC).save(path, quality=95)
            files[cls].append(path)
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    train = _images(root / "train", 12, seed=1)
    _images(root / "prior", 6, seed=2)
    shares = [{c: train[c][:6] for c in CLASSES}, {c: train[c][6:] for c in CLASSES}]  # two owners, 12 images each
    return root, shares


def _cfg(root, **cells) -> FrontierConfig:
    return FrontierConfig(data=root / "train", one_at_a_time=2, out=root / "out", **cells)


@pytest.mark.parametrize("strategy, n", [("shared-key", 24), ("pooled", 12), ("per-image-keys", 1)])
def test_attack_columns_measure_what_one_key_covers(data, strategy, n):
    root, shares = data
    cell = CellSpec("color32-b16", owners=2, strategy=strategy)
    attacks = attack_columns(cell, shares, root / "prior", _cfg(root), root / f"work-{strategy}")
    assert set(attacks) == set(ATTACKS)
    assert attacks["ciphertext only"]["images"] == n  # every image / one owner's share / one image
    assert attacks["known plaintext"]["images"] == 1  # one pair
    for result in attacks.values():
        assert result["verdict"] in VERDICTS and 0 <= result["key"] <= 1 and -1 <= result["ssim"] <= 1
    if strategy != "per-image-keys":  # one pair under a reused key gives the schedule away
        assert attacks["known plaintext"]["verdict"] == "broken"


def test_federated_rows_say_no_image_is_sent(data):
    root, shares = data
    attacks = attack_columns(CellSpec("color32-b16", 2, strategy="federated"), shares, root / "prior", _cfg(root),
                             root / "work-fed")
    assert "never leave the owner" in attacks["ciphertext only"]["note"]
    assert all("key" not in r for r in attacks.values())


def _record(name_cell: CellSpec, attacks: dict | None, training: dict | None) -> dict:
    record = {"name": name_cell.name, "cell": dataclasses.asdict(name_cell)}
    if attacks is not None:
        record["attacks"] = attacks
    if training is not None:
        record["training"] = training
    return record


def test_table_has_every_column_and_labels_rows_by_cell(data):
    root, shares = data
    cfg = _cfg(root)
    cells = [CellSpec("color32-b16", 2, "iid", "shared-key"), CellSpec("gray32-b8", 2, "dirichlet", "pooled")]
    records = [_record(cells[0], attack_columns(cells[0], shares, root / "prior", cfg, root / "w0"),
                       {"accuracy": 0.5, "wrong_key_accuracy": 0.125, "wrong_key_refused": False}),
               _record(cells[1], None, None)]
    lines = table(records).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(COLUMNS) == [
        "geometry", "strategy", "owners", "mean owner accuracy", "wrong-key accuracy",
        "ciphertext only at N: key / SSIM / verdict", "known plaintext, 1 pair: key / SSIM / verdict",
        "one image at a time: key / SSIM / verdict", "the owner manages"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(COLUMNS) for r in rows)
    assert rows[0][:5] == ["color32-b16", "shared-key", "K = 2 iid", "50.0%", "12.5%"]
    assert rows[0][5].endswith("(N = 24)") and rows[0][-1] == OWNER_MANAGES["shared-key"]
    assert rows[1][:6] == ["gray32-b8", "pooled", "K = 2 dirichlet", "not run", "not run", "not run"]


def test_results_accumulate_across_invocations(data):
    root, _ = data
    out = root / "acc"
    cell = CellSpec("color64-b16", 4, "iid", "shared-key")
    write_outputs(out, _record(cell, {"ciphertext only": {"note": "x"}}, None))
    write_outputs(out, _record(CellSpec("color32-b16", 4, "iid", "pooled"), None, None))
    write_outputs(out, {"name": cell.name, "training": {"accuracy": 0.25, "wrong_key_accuracy": None}})
    saved = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(saved) == {cell.name, "color32-b16 k4-iid pooled"}
    assert saved[cell.name]["attacks"] == {"ciphertext only": {"note": "x"}}  # kept from the first run
    assert saved[cell.name]["training"]["accuracy"] == 0.25
    assert "| color64-b16 | shared-key | K = 4 iid | 25.0% | - |" in (out / "results.md").read_text()


def test_config_rejects_unknown_cells(data):
    root, _ = data
    good = CellSpec(next(iter(GEOMETRIES)))
    check_config(_cfg(root, cells=(good,)))
    for bad, field in [(dict(cells=(CellSpec("color32-b4"),)), "cells[0].geometry"),
                       (dict(cells=(CellSpec("gray32-b8", partition="skewed"),)), "cells[0].partition"),
                       (dict(cells=(CellSpec("gray32-b8", strategy="magic"),)), "cells[0].strategy"),
                       (dict(cells=(CellSpec("gray32-b8", owners=0),)), "cells[0].owners"),
                       (dict(cells=(good,), only_cells=("nope",)), "only_cells")]:
        with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            check_config(_cfg(root, **bad))
