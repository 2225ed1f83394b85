"""``orchestrator check`` against a careless or hostile operator's config (an attacker's tests): every
number in range, the model name real, tokens never on a plaintext listener off loopback, the Ray
dashboard never on the network. Found only after all uploads (or after training) is too late."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from orchestrator.config import ClusterConfig, ConfigError, parse_config
from tests.test_config import base

BAD = [
    ("training", "lr", -0.1), ("training", "lr", 0), ("training", "lr", math.nan), ("training", "lr", math.inf),
    ("training", "label_smoothing", 5), ("training", "label_smoothing", 1.0), ("training", "max_failures", -3),
    ("training", "weight_decay", -1), ("training", "mixup_alpha", -0.5), ("training", "cutmix_prob", 1.5),
    ("training", "batch_size", 0), ("training", "batch_size", 10**9), ("training", "epochs", 0),
    ("training", "workers", 0), ("training", "cpus_per_worker", -1), ("training", "wait_timeout_s", 0),
    ("training", "adapter_lr_scale", 0), ("training", "seed", -1), ("ingest", "max_shard_bytes", -1),
    ("ingest", "max_shard_bytes", 0), ("ray", "dashboard_port", 70000), ("federated", "round_timeout_s", -5),
    ("federated", "local_epochs", 0), ("federated", "min_owners", 0), ("serve", "max_concurrent_requests", 0),
    ("serve", "max_images_per_request", 10**6),
]


@pytest.mark.parametrize("section, name, value", BAD, ids=[f"{s}.{n}={v}" for s, n, v in BAD])
def test_an_out_of_range_number_is_refused_naming_its_field(section, name, value):
    doc = base()
    doc.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: .* outside the allowed range"):
        parse_config(doc)


def _numeric_fields(cls: type, where: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
        if inner[0] in (int, float):
            yield f"{where}{f.name}", f
        elif dataclasses.is_dataclass(inner[0]):
            yield from _numeric_fields(inner[0], f"{where}{f.name}.")
        elif typing.get_origin(inner[0]) is tuple and dataclasses.is_dataclass(typing.get_args(inner[0])[0]):
            yield from _numeric_fields(typing.get_args(inner[0])[0], f"{where}{f.name}[].")


def test_every_number_in_the_config_has_a_declared_range():
    """The class of problem: a number added later without a range would pass ``check`` unbounded."""
    unbounded = [path for path, f in _numeric_fields(ClusterConfig) if "range" not in f.metadata
                 and not path.startswith("task.")]  # the task checks its own numbers (protocol/task.py)
    assert unbounded == []


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["training"].update(model="convmixer_256_8_p4_k99"), "training.model: unknown model"),
    (lambda d: d["training"].update(model="vit_192_6_p4_32"), "training.model"),  # patch 4 on 16-pixel blocks
    (lambda d: d.update(serve={"listen": "0.0.0.0:50052"}), "serve.listen: .* clear text"),
    (lambda d: d.update(ray={"dashboard_host": "0.0.0.0"}), "ray.dashboard_host"),
])
def test_mistakes_found_by_check_not_after_uploads(edit, message):
    doc = base()
    edit(doc)
    with pytest.raises(ConfigError, match=message):
        parse_config(doc)


def test_a_good_config_still_passes_and_a_remote_ray_may_have_its_own_dashboard():
    doc = base()
    doc["ray"] = {"address": "ray://head:10001", "dashboard_host": "0.0.0.0"}  # not ours to start
    assert parse_config(doc).ray.address == "ray://head:10001"
