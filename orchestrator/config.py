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

from mlcore.settings import PRECISIONS, STRATEGIES, TrainSettings, bounded, range_errors
from protocol.net import is_loopback, split_listen
from protocol.privacy import privacy_verdict
from protocol.task import Task, TaskError, is_safe_name

OWNER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
NODE_KEY = re.compile(r"^ecdsa-sha2-nistp(256|384|521) [A-Za-z0-9+/]+={0,2}( \S.*)?$")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray (with dashboard); "auto" or "ray://head:10001"
    dashboard_host: str = "127.0.0.1"  # local Ray only; keep the dashboard off the network by default
    dashboard_port: int = bounded(8265, 1, 65_535)


@dataclass(frozen=True)
class TlsConfig:
    cert: Path  # server certificate chain (PEM)
    key: Path  # server private key (PEM)
    client_ca: Path | None = None  # set: mutual TLS, clients need a certificate signed by this CA
    ca: Path | None = None  # the CA that signed ``cert``: the Flower SuperLink needs it (federated mode)


@dataclass(frozen=True)
class OwnerEntry:
    id: str  # owner id; the token decides who is who
    token_sha256: str  # hex sha256 of the owner's token; the server never stores tokens
    node_public_key: str | None = None  # federated mode with TLS: the owner's SuperNode key, the line
    # `owner-agent node-key` prints (ecdsa-sha2-nistp384 ...); a node without a registered key is refused


@dataclass(frozen=True)
class SharedKey:
    """A key id that several owners may upload under (one key, several sites of one organisation).
    Without an entry, a key id belongs to the first owner that uploaded under it."""

    key_id: str
    owners: tuple[str, ...]


@dataclass(frozen=True)
class IngestConfig:
    listen: str = "127.0.0.1:50051"
    store: Path = Path("./store")  # relative paths are relative to the config file
    tls: TlsConfig | None = None
    owners: tuple[OwnerEntry, ...] = ()
    insecure_loopback: bool = False  # allow auth without TLS, only when listening on loopback
    max_shard_bytes: int = bounded(1 << 30, 1 << 10, 1 << 40)  # refuse larger shards (bytes)
    shared_keys: tuple[SharedKey, ...] = ()  # key ids that several named owners may upload under
    # Resource limits: one owner, or one stalled client, must not block ingest for the others.
    max_streams_per_owner: int = bounded(4, 1, 1024)  # upload streams one owner may hold at once; more are
    # refused at once (retryable). The agent opens 2; 4 lets a rerun take over from a stalled run's 2
    stream_idle_timeout_s: float = bounded(60.0, 0.1, 3600.0)  # seconds an upload stream may send nothing
    # before it is ended and its shard freed; a live agent sends a 1 MiB chunk every few seconds even at
    # 256 KiB/s, a stalled one (suspended, SIGSTOP, dead link) holds a slot no longer than this
    workers: int = bounded(0, 0, 4096)  # threads serving calls; 0: owners x max_streams_per_owner + 32, so
    # the limits, not the thread pool, decide who waits (calls beyond the pool are refused, never queued)
    max_connections: int = bounded(4096, 16, 1_000_000)  # TCP connections held at once (file descriptors);
    # beyond, new ones are closed at once. Keep it under the hard open-file limit (ulimit -Hn)
    handshake_timeout_s: float = bounded(10.0, 1.0, 300.0)  # seconds a new connection has to finish its
    # TLS/HTTP/2 handshake; silent sockets are closed after this (gRPC's default is 120 s)
    connection_idle_s: float = bounded(600.0, 1.0, 7 * 86400)  # seconds a connection with no call open is
    # kept; agents reconnect by themselves
    owner_quota_bytes: int = bounded(1 << 40, 1 << 10, 1 << 60)  # bytes one owner may hold: its stored
    # shards plus its partial uploads (1 TiB: a large hospital archive); beyond, RESOURCE_EXHAUSTED
    partial_expiry_s: float = bounded(7 * 86400, 1.0, 365 * 86400)  # seconds a partial upload may sit
    # untouched before it is deleted (a week: an agent stopped on Friday resumes on Monday)


@dataclass(frozen=True)
class TrainingConfig(TrainSettings):
    """``training:``: the ML core's settings (``mlcore/settings.py``) plus how the cloud runs them."""

    workers: int = bounded(1, 1, 4096)  # Ray Train workers
    cpus_per_worker: int = bounded(0, 0, 4096)  # 0: all CPUs of the machine divided among the workers
    use_gpu: bool = False
    max_failures: int = bounded(2, 0, 1000)  # Ray Train restarts from the last checkpoint this many times
    start_when: tuple[str, ...] = ()  # owners whose train and test uploads start training
    wait_timeout_s: int = bounded(3600, 1, 30 * 86400)  # give up waiting for those uploads after this long
    max_bad_fraction: float = bounded(0.01, 0.0, 1.0)  # an owner with more of its images unusable (undecodable,
    # wrong size or format, label outside the classes) is left out of the run entirely; fewer are skipped


@dataclass(frozen=True)
class ServeConfig:
    listen: str = "127.0.0.1:50052"
    max_concurrent_requests: int = bounded(4, 1, 256)  # more at once are refused (RESOURCE_EXHAUSTED): each
    # holds a decoded batch and a forward pass in memory
    max_images_per_request: int = bounded(256, 1, 4096)  # fewer for large images: see serve.images_per_request


@dataclass(frozen=True)
class FederatedConfig:
    """training.strategy federated: owners train at home; the server only averages the trunk."""

    listen: str = "127.0.0.1:9092"  # the Flower SuperLink (owners' SuperNodes connect here)
    local_epochs: int = bounded(1, 1, 1000)  # epochs per round at each owner; rounds = training.epochs / local_epochs
    min_owners: int = bounded(2, 1, 10_000)  # a round waits for this many connected owners (and goes on with them)
    round_timeout_s: float = bounded(1800.0, 1.0, 7 * 86400)  # give up on replies after this long per phase
    # (a dead owner is noticed by Flower's heartbeat within about a minute anyway)
    secure_aggregation: bool = False  # Flower SecAgg+: the server sees only the sum of the owners' trunk updates
    # Convergence (docs/results.md, "Federated convergence", measured every option at the CPU budget):
    rounds_per_epoch: int = bounded(8, 1, 100)  # > 1: more, shorter rounds (1/this of a local epoch each) at
    # the same budget: the trunk is averaged more often; needs local_epochs 1
    schedule: str = "run"  # run: each owner keeps its AdamW state and follows one one-cycle over the whole run,
    # as centralised training does | round: a fresh AdamW one-cycle per round (the mode's first version)
    local_batchnorm: bool = True  # FedBN: BatchNorm weights and statistics stay with each owner, never averaged
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi (Flower's strategies)
    server_lr: float = bounded(1.0, 1e-4, 10.0)  # step on the owners' mean update; 1 with fedavg is FedAvg itself,
    # above 1 extrapolates (the mean of K short local runs moves less than one run K times as long)
    server_momentum: float = bounded(0.0, 0.0, 0.99)  # fedavgm: heavy-ball momentum across rounds (< 1: it must decay)
    server_beta_1: float = bounded(0.9, 0.0, 0.999)  # fedadam/fedyogi: first-moment decay
    server_beta_2: float = bounded(0.99, 0.0, 0.9999)  # fedadam/fedyogi: second-moment decay
    server_tau: float = bounded(1e-3, 1e-9, 1.0)  # fedadam/fedyogi: adaptivity floor (a step is at most ~lr/tau x
    # the update); below 1e-9 float32 weights cannot tell it from 0
    evaluate_every: int = bounded(1, 1, 10_000)  # owners evaluate on their test split every this many local epochs
    # (rounds_per_epoch rounds each) and after the last round: evaluating every short round would cost as much
    # as training


@dataclass(frozen=True)
class ClusterConfig:
    name: str  # run name: Ray Train run name and store sub-folder
    task: Task  # published to owner-agents: every owner maps folders to the same labels and geometry
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
    try:
        return cls(**kwargs)
    except TaskError as exc:  # the task checks itself; its message names the field
        raise ConfigError(str(exc)) from None


# --------------------------------------------------------------------------- rules


def _check_listen(value: str, where: str) -> None:
    try:
        split_listen(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_ranges(obj: object, where: str = "") -> None:
    """Every bounded number in the tree (``mlcore.settings.bounded``) inside its range."""
    if isinstance(obj, tuple):
        for i, item in enumerate(obj):
            _check_ranges(item, f"{where[:-1]}[{i}].")
        return
    if not dataclasses.is_dataclass(obj):
        return
    errors = range_errors(obj, where)
    if errors:
        raise ConfigError(errors[0])
    for f in dataclasses.fields(obj):
        _check_ranges(getattr(obj, f.name), f"{where}{f.name}.")


def _check_tls_listener(cfg: ClusterConfig, listen: str, where: str) -> None:
    """Tokens travel on every listener: off loopback, only over TLS."""
    if cfg.ingest.tls is None and not (cfg.ingest.insecure_loopback and is_loopback(listen)):
        raise ConfigError(f"{where}: {listen} would take owners' tokens in clear text; configure ingest.tls, "
                          "or listen on loopback and set ingest.insecure_loopback: true")


def _validate(cfg: ClusterConfig) -> None:
    _check_ranges(cfg)
    if not is_safe_name(cfg.name):  # the same rule owners check the run name against (it names folders)
        raise ConfigError(f"name: {cfg.name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if len(cfg.task.classes) < 2:
        raise ConfigError("task.classes: need at least two distinct class names")
    _validate_ingest(cfg.ingest)
    _check_listen(cfg.serve.listen, "serve.listen")
    if cfg.ingest.owners:
        _check_tls_listener(cfg, cfg.serve.listen, "serve.listen")
    if cfg.ray.address is None and not is_loopback(f"{cfg.ray.dashboard_host}:0"):
        raise ConfigError(f"ray.dashboard_host: {cfg.ray.dashboard_host} would open the Ray dashboard, which has no "
                          "login and can run jobs, to the network; keep 127.0.0.1 and reach it through an SSH tunnel")
    _validate_training(cfg.training, cfg.task, cfg.ingest)
    _validate_federated(cfg)


def _validate_ingest(ing: IngestConfig) -> None:
    _check_listen(ing.listen, "ingest.listen")
    ids = [o.id for o in ing.owners]
    for i, owner in enumerate(ing.owners):
        if not OWNER_ID.match(owner.id):
            raise ConfigError(f"ingest.owners[{i}].id: {owner.id!r} must be lower-case letters, digits, '.', '_' "
                              "or '-'")
        if not SHA256_HEX.match(owner.token_sha256):
            raise ConfigError(f"ingest.owners[{i}].token_sha256: expected 64 lower-case hex digits")
    if len(set(ids)) != len(ids):
        raise ConfigError("ingest.owners: owner ids must be unique")
    if len({o.token_sha256 for o in ing.owners}) != len(ids):
        raise ConfigError("ingest.owners: two owners share a token")
    if ing.tls is None and ing.owners and not (ing.insecure_loopback and is_loopback(ing.listen)):
        raise ConfigError(
            "ingest.tls: tokens would travel in clear text; configure tls, or listen on loopback "
            "and set ingest.insecure_loopback: true"
        )
    _validate_shared_keys(ing.shared_keys, set(ids))


def _validate_shared_keys(shared: tuple[SharedKey, ...], owners: set[str]) -> None:
    for i, entry in enumerate(shared):
        if not is_safe_name(entry.key_id):
            raise ConfigError(f"ingest.shared_keys[{i}].key_id: {entry.key_id!r} is not a key id")
        unknown = sorted(set(entry.owners) - owners)
        if unknown:
            raise ConfigError(f"ingest.shared_keys[{i}].owners: {', '.join(unknown)} not in ingest.owners")
        if len(set(entry.owners)) < 2:
            raise ConfigError(f"ingest.shared_keys[{i}].owners: a shared key names at least two owners")
    key_ids = [e.key_id for e in shared]
    if len(set(key_ids)) != len(key_ids):
        raise ConfigError("ingest.shared_keys: a key id is listed twice")


def _validate_training(tr: TrainingConfig, task: Task, ing: IngestConfig) -> None:
    if tr.strategy not in STRATEGIES:
        raise ConfigError(f"training.strategy: {tr.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if tr.keyed and not task.encrypted:
        raise ConfigError(f"training.strategy: {tr.strategy!r} needs encrypted data (task.scheme color or gray)")
    if (tr.strategy == "plain") != (not task.encrypted):
        raise ConfigError("training.strategy: 'plain' goes with task.scheme 'plain' and only with it")
    if tr.precision not in PRECISIONS:
        raise ConfigError(f"training.precision: {tr.precision!r} is not one of {', '.join(PRECISIONS)}")
    _check_per_image_keys(tr, task)
    _check_model(tr, task)
    missing = [o for o in tr.start_when if o not in {o.id for o in ing.owners}]
    if missing:
        raise ConfigError(f"training.start_when: {', '.join(missing)} not in ingest.owners")


def _check_per_image_keys(tr: TrainingConfig, task: Task) -> None:
    """A fresh key per image needs a network that needs no key, and only such data trains one."""
    from models.invariant import is_invariant

    if (tr.strategy == "per-image-keys") != task.per_image_keys:
        raise ConfigError(f"training.strategy: {tr.strategy!r} with task.key_mode {task.key_mode!r}; strategy "
                          "'per-image-keys' goes with task.key_mode 'per-image' and only with it")
    if task.per_image_keys and not is_invariant(tr.model):
        raise ConfigError(f"training.model: {tr.model!r} is not invariant to the key; a fresh key per image needs "
                          "one of models/invariant.py (invariant_*, e.g. invariant_256_8_p2_k5_attn2)")


def _check_model(tr: TrainingConfig, task: Task) -> None:
    """Build the network once, on the meta device (no memory, no weights): a typo in the model name or a
    patch that does not fit the block grid is found by ``orchestrator check``, not after every upload."""
    import torch  # heavy, and only the validation of a training section needs it

    from models import ModelConfigError, build_model  # heavy (timm), see above

    shape = task.model_input
    try:
        with torch.device("meta"):
            build_model(tr.model, len(task.classes), shape.shape, shape.in_chans,
                        task.block_size if task.encrypted else None)
    except ModelConfigError as exc:
        raise ConfigError(f"training.model: {exc}") from None


def _validate_federated(cfg: ClusterConfig) -> None:
    fed, tr = cfg.federated, cfg.training
    _check_listen(fed.listen, "federated.listen")
    if tr.strategy != "federated":
        if fed.secure_aggregation:
            raise ConfigError(f"federated.secure_aggregation: only for training.strategy 'federated' (not "
                              f"{tr.strategy!r}, which trains in the cloud on the owners' uploads)")
        return
    if fed.secure_aggregation:
        from mlcore.federated import SECURE_SUM  # torch: only for a config that asks for it

        low, high = SECURE_SUM.min_owners, SECURE_SUM.max_owners
        if not low <= fed.min_owners <= high:
            raise ConfigError(f"federated.min_owners: {fed.min_owners} is outside [{low}, {high}], the owners per "
                              "round with which secure aggregation (federated.secure_aggregation, Flower's SecAgg+) "
                              "works: the sum of one owner's update is that update; with 3 or more a round survives "
                              "one owner dropping out")
    if tr.epochs % fed.local_epochs:
        raise ConfigError(f"federated.local_epochs ({fed.local_epochs}) must divide training.epochs ({tr.epochs}): "
                          "rounds x local epochs is the budget")
    _check_convergence_options(fed)
    tls = cfg.ingest.tls
    if tls is not None and tls.ca is None:
        raise ConfigError("ingest.tls.ca: the federated mode's Flower SuperLink needs the CA certificate that "
                          "signed ingest.tls.cert")
    if tls is None and not is_loopback(fed.listen):
        raise ConfigError("federated.listen: without ingest.tls the Flower link is plaintext; listen on loopback "
                          "or configure ingest.tls (with ca)")
    if tls is not None:
        _validate_node_keys(cfg.ingest.owners)


SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
SCHEDULES = ("round", "run")


def _check_convergence_options(fed: FederatedConfig) -> None:
    if fed.server_optimizer not in SERVER_OPTIMIZERS:
        raise ConfigError(f"federated.server_optimizer: {fed.server_optimizer!r} is not one of "
                          f"{', '.join(SERVER_OPTIMIZERS)}")
    if fed.schedule not in SCHEDULES:
        raise ConfigError(f"federated.schedule: {fed.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if fed.rounds_per_epoch > 1 and fed.local_epochs != 1:
        raise ConfigError(f"federated.rounds_per_epoch: {fed.rounds_per_epoch} splits one local epoch into rounds; "
                          f"it needs federated.local_epochs 1 (not {fed.local_epochs})")
    if fed.server_optimizer in ("fedadam", "fedyogi") and not fed.local_batchnorm:
        raise ConfigError(f"federated.server_optimizer: {fed.server_optimizer} takes an adaptive step on every "
                          "averaged tensor, BatchNorm's running statistics too (they are not gradients); it needs "
                          "federated.local_batchnorm: true, which keeps them with the owners")


def _validate_node_keys(owners: tuple[OwnerEntry, ...]) -> None:
    """Federated with TLS: every owner's SuperNode authenticates with a key registered here."""
    for i, owner in enumerate(owners):
        if owner.node_public_key is None:
            raise ConfigError(f"ingest.owners[{i}].node_public_key: required for the federated mode with TLS "
                              "(the owner runs `owner-agent node-key` and sends you the line it prints)")
        if not NODE_KEY.match(owner.node_public_key):
            raise ConfigError(f"ingest.owners[{i}].node_public_key: expected an OpenSSH NIST EC public key line "
                              "(ecdsa-sha2-nistp256|384|521 AAAA...)")
    keys = [o.node_public_key.split()[1] for o in owners]
    if len(set(keys)) != len(keys):
        raise ConfigError("ingest.owners: two owners share a node_public_key")


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


def privacy_warning(task: Task) -> str | None:
    """The owners' privacy verdict on the task's cipher geometry and key mode, in their words, for
    `orchestrator check`; None for plain tasks."""
    if not task.encrypted:
        return None
    return privacy_verdict(task.scheme, task.image_size, task.image_size, task.block_size, task.key_mode)[1]
