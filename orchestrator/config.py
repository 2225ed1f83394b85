"""``cluster.yaml``: parsed once into frozen dataclasses; unknown keys and bad values are errors.

Every error names the file and the dotted field, e.g. ``cluster.yaml: training.epochs: expected
an integer, got 'ten'``. Defaults live here, in the dataclasses, and nowhere else.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCHEMES = ("color", "gray", "plain")
FORMATS = ("jpeg", "png")
CHROMAS = ("420", "444")
STRATEGIES = ("plain", "shared-key", "pooled", "key-adapters", "federated")
KEYED_STRATEGIES = ("key-adapters", "federated")  # a per-key adapter in front of a shared trunk
PRECISIONS = ("auto", "fp32", "bf16")
OWNER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray (with dashboard); "auto" or "ray://head:10001"
    dashboard_host: str = "127.0.0.1"  # local Ray only; keep the dashboard off the network by default
    dashboard_port: int = 8265


@dataclass(frozen=True)
class TaskConfig:
    """Published to owner-agents: every owner maps folders to the same labels and geometry."""

    classes: tuple[str, ...]  # label id = position in this list
    image_size: int = 32  # pixels, square
    block_size: int = 16  # EtC block in pixels (colour 16, gray 8)
    scheme: str = "color"  # color | gray | plain
    format: str = "jpeg"  # jpeg | png
    quality: int = 85  # JPEG quality
    chroma: str = "420"  # JPEG chroma subsampling: 420 | 444


@dataclass(frozen=True)
class TlsConfig:
    cert: Path  # server certificate chain (PEM)
    key: Path  # server private key (PEM)
    client_ca: Path | None = None  # set: mutual TLS, clients need a certificate signed by this CA


@dataclass(frozen=True)
class OwnerEntry:
    id: str  # owner id; the token decides who is who
    token_sha256: str  # hex sha256 of the owner's token; the server never stores tokens


@dataclass(frozen=True)
class IngestConfig:
    listen: str = "127.0.0.1:50051"
    store: Path = Path("./store")  # relative paths are relative to the config file
    tls: TlsConfig | None = None
    owners: tuple[OwnerEntry, ...] = ()
    insecure_loopback: bool = False  # allow auth without TLS, only when listening on loopback
    max_shard_bytes: int = 1 << 30  # refuse larger shards (bytes)


@dataclass(frozen=True)
class TrainingConfig:
    strategy: str = "shared-key"  # plain | shared-key | pooled | key-adapters | federated
    model: str = "convmixer_256_8_p4_k9"  # a name registered in models/ (or any timm name)
    epochs: int = 10
    batch_size: int = 64  # per worker
    workers: int = 1  # Ray Train workers
    cpus_per_worker: int = 0  # 0: all CPUs of the machine divided among the workers
    use_gpu: bool = False
    lr: float = 0.01  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # > 0: mixup with Beta(alpha, alpha) (the paper used mixup + CutMix)
    cutmix_prob: float = 0.0  # probability of block-aligned CutMix instead of mixup for a batch
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU: bf16 is 6x slower on CPUs without AMX) | fp32 | bf16
    pretrained_file: Path | None = None  # local weights for timm models (e.g. ViT-B/16); never downloaded
    max_failures: int = 2  # Ray Train restarts from the last checkpoint this many times
    adapter_lr_scale: float = 10.0  # key-adapters/federated: adapters' peak lr = lr x this (they
    # must travel from "every block everywhere" to a hard permutation within one schedule)
    seed: int = 0
    start_when: tuple[str, ...] = ()  # owners whose train and test uploads start training
    wait_timeout_s: int = 3600  # give up waiting for those uploads after this long


@dataclass(frozen=True)
class ServeConfig:
    listen: str = "127.0.0.1:50052"


@dataclass(frozen=True)
class FederatedConfig:
    """training.strategy federated: owners train at home; the server only averages the trunk."""

    listen: str = "127.0.0.1:9092"  # the Flower SuperLink (owners' SuperNodes connect here)
    local_epochs: int = 1  # epochs per round at each owner; rounds = training.epochs / local_epochs
    min_owners: int = 2  # a round waits for this many connected owners (and goes on with them)
    round_timeout_s: float = 1800.0  # give up on replies after this long per phase (a dead owner
    # is noticed by Flower's heartbeat within about a minute anyway)


@dataclass(frozen=True)
class ClusterConfig:
    name: str  # run name: Ray Train run name and store sub-folder
    task: TaskConfig
    ray: RayConfig = RayConfig()
    ingest: IngestConfig = IngestConfig()
    training: TrainingConfig = TrainingConfig()
    serve: ServeConfig = ServeConfig()
    federated: FederatedConfig = FederatedConfig()
    source: Path | None = field(default=None, compare=False)  # the file it came from


# --------------------------------------------------------------------------- generic parsing


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(tp: object, value: object, where: str, base: Path) -> object:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, where, base)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(inner, v, f"{where}[{i}]", base) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path, got {_describe(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    raise TypeError(f"unsupported config type {tp} at {where}")


def _build(cls: type, data: object, where: str, base: Path) -> object:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown key(s) {', '.join(unknown)} "
                          f"(allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], path, base)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required")
    return cls(**kwargs)


# --------------------------------------------------------------------------- rules


def _check_listen(value: str, where: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")


def is_loopback(listen: str) -> bool:
    return listen.rpartition(":")[0] in LOOPBACK_HOSTS


def _validate(cfg: ClusterConfig) -> None:
    t = cfg.task
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", cfg.name):
        raise ConfigError(f"name: {cfg.name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if len(t.classes) < 2 or len(set(t.classes)) != len(t.classes):
        raise ConfigError("task.classes: need at least two distinct class names")
    if t.scheme not in SCHEMES:
        raise ConfigError(f"task.scheme: {t.scheme!r} is not one of {', '.join(SCHEMES)}")
    if t.format not in FORMATS:
        raise ConfigError(f"task.format: {t.format!r} is not one of {', '.join(FORMATS)}")
    if t.chroma not in CHROMAS:
        raise ConfigError(f"task.chroma: {t.chroma!r} is not one of {', '.join(CHROMAS)}")
    if not 1 <= t.quality <= 100:
        raise ConfigError(f"task.quality: {t.quality} is not in 1..100")
    if t.image_size < 1 or (t.scheme != "plain" and (t.block_size < 1 or t.image_size % t.block_size)):
        raise ConfigError(f"task.image_size: {t.image_size} is not a multiple of task.block_size {t.block_size}")
    _check_listen(cfg.ingest.listen, "ingest.listen")
    _check_listen(cfg.serve.listen, "serve.listen")
    ids = [o.id for o in cfg.ingest.owners]
    for i, owner in enumerate(cfg.ingest.owners):
        if not OWNER_ID.match(owner.id):
            raise ConfigError(f"ingest.owners[{i}].id: {owner.id!r} must be lower-case letters, digits, '.', '_' or '-'")
        if not SHA256_HEX.match(owner.token_sha256):
            raise ConfigError(f"ingest.owners[{i}].token_sha256: expected 64 lower-case hex digits")
    if len(set(ids)) != len(ids):
        raise ConfigError("ingest.owners: owner ids must be unique")
    if len({o.token_sha256 for o in cfg.ingest.owners}) != len(ids):
        raise ConfigError("ingest.owners: two owners share a token")
    if cfg.ingest.tls is None and cfg.ingest.owners and not (
        cfg.ingest.insecure_loopback and is_loopback(cfg.ingest.listen)
    ):
        raise ConfigError(
            "ingest.tls: tokens would travel in clear text; configure tls, or listen on loopback "
            "and set ingest.insecure_loopback: true"
        )
    tr = cfg.training
    if tr.strategy not in STRATEGIES:
        raise ConfigError(f"training.strategy: {tr.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if (tr.strategy == "plain") != (t.scheme == "plain"):
        raise ConfigError("training.strategy: 'plain' goes with task.scheme 'plain' and only with it")
    for name in ("epochs", "batch_size", "workers"):
        if getattr(tr, name) < 1:
            raise ConfigError(f"training.{name}: must be at least 1")
    if tr.precision not in PRECISIONS:
        raise ConfigError(f"training.precision: {tr.precision!r} is not one of {', '.join(PRECISIONS)}")
    if tr.adapter_lr_scale <= 0:
        raise ConfigError("training.adapter_lr_scale: must be positive")
    if tr.strategy in KEYED_STRATEGIES and t.scheme == "plain":
        raise ConfigError(f"training.strategy: {tr.strategy!r} needs encrypted data (task.scheme color or gray)")
    if not 0 <= tr.cutmix_prob <= 1 or tr.mixup_alpha < 0:
        raise ConfigError("training.cutmix_prob must be in [0, 1] and training.mixup_alpha >= 0")
    fed = cfg.federated
    _check_listen(fed.listen, "federated.listen")
    if fed.local_epochs < 1 or fed.min_owners < 1 or fed.round_timeout_s <= 0:
        raise ConfigError("federated.local_epochs and federated.min_owners must be >= 1, round_timeout_s > 0")
    if tr.strategy == "federated" and tr.epochs % fed.local_epochs:
        raise ConfigError(f"federated.local_epochs ({fed.local_epochs}) must divide training.epochs ({tr.epochs}): "
                          "rounds x local epochs is the budget")
    missing = [o for o in tr.start_when if o not in ids]
    if missing:
        raise ConfigError(f"training.start_when: {', '.join(missing)} not in ingest.owners")


def parse_config(data: object, source: Path | None = None) -> ClusterConfig:
    base = source.parent if source else Path.cwd()
    prefix = f"{source.name}: " if source else ""
    try:
        cfg = _build(ClusterConfig, data, "", base)
        cfg = dataclasses.replace(cfg, source=source)
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(prefix + str(exc)) from None
    return cfg


def load_config(path: Path | str) -> ClusterConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    return parse_config(data, path.resolve())


def load_dataclass(cls: type, path: Path | str):
    """Any frozen-dataclass config from YAML, with the same strict checks and messages."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
        return _build(cls, data, "", path.resolve().parent)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None
