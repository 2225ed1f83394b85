"""cluster.yaml parsing: strict, with messages naming the file and field."""
import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "deploy" / "local-cpu.yaml"


def base() -> dict:
    return yaml.safe_load(LOCAL.read_text())


def test_shipped_local_config_is_valid_and_paths_resolve_next_to_it():
    cfg = load_config(LOCAL)
    assert cfg.task.classes[0] == "airplane" and cfg.task.image_size == 32
    assert cfg.ingest.store == LOCAL.parent / "../store"
    assert cfg.training.start_when == ("hospital-a", "hospital-b")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["training"].update(epochs="ten"), "training.epochs: expected an integer, got 'ten'"),
    (lambda d: d["training"].update(epoch=3), "training: unknown key(s) epoch"),
    (lambda d: d.update(extra=1), "unknown key(s) extra"),
    (lambda d: d["task"].pop("classes"), "task.classes: required"),
    (lambda d: d["task"].update(image_size=40), "task.image_size: 40 is not a multiple of task.block_size 16"),
    (lambda d: d["task"].update(scheme="rot13"), "task.scheme: 'rot13'"),
    (lambda d: d["training"].update(start_when=["hospital-z"]), "training.start_when: hospital-z not in ingest.owners"),
    (lambda d: d["ingest"]["owners"][0].update(token_sha256="abc"), "ingest.owners[0].token_sha256"),
    (lambda d: d["ingest"].update(insecure_loopback=False), "ingest.tls: tokens would travel in clear text"),
    (lambda d: d["ingest"].update(listen="0.0.0.0:50051"), "ingest.tls"),
    (lambda d: d["ingest"].update(listen="nohost"), "ingest.listen: expected HOST:PORT"),
    (lambda d: d["training"].update(use_gpu="yes"), "training.use_gpu: expected true or false"),
    (lambda d: d["training"].update(strategy="plain"), "training.strategy: 'plain' goes with task.scheme 'plain'"),
])
def test_bad_configs_name_the_field(edit, message):
    data = copy.deepcopy(base())
    edit(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data, LOCAL)
    assert message in str(err.value)
    assert str(err.value).startswith("local-cpu.yaml: ")


def test_check_command(tmp_path, capsys):
    assert main(["check", str(LOCAL)]) == 0
    assert '"image_size": 32' in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: [1, 2\n")
    assert main(["check", str(bad)]) == 1
    assert "bad.yaml: not valid YAML" in capsys.readouterr().err


def test_federated_link_is_loopback_or_tls():
    """The Flower link carries every round's trunk: plaintext only on loopback, and TLS needs its CA."""
    data = base()
    data["training"].update(strategy="federated", epochs=2)
    data["federated"] = {"listen": "0.0.0.0:9092", "local_epochs": 1}
    with pytest.raises(ConfigError, match="federated.listen: without ingest.tls"):
        parse_config(copy.deepcopy(data))
    data["federated"]["listen"] = "127.0.0.1:9092"
    assert parse_config(copy.deepcopy(data)).federated.listen == "127.0.0.1:9092"
