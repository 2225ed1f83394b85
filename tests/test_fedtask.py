"""The federated mode's pieces without processes: what is shared, what stays, and one simulated
federation with Flower's simulation on a real local Ray."""
from pathlib import Path

import pytest
import torch

from mlcore.federated import (
    SHARED_PREFIX,
    FederatedPlan,
    load_states,
    owner_model,
    owner_network,
    private_state,
    shared_state,
)
from mlcore.settings import TrainSettings
from models.keyed import decode_adapter
from owners.cipher import CipherGeometry, derive_schedule
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.errors import OutboxError
from owners.keys import OwnerKey
from owners.predict import predict_federated
from protocol.task import Task

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10-sample"
PLAN = FederatedPlan(Task(("a", "b", "c")),
                     TrainSettings(strategy="federated", epochs=2, batch_size=16, lr=0.003), rounds=2, local_epochs=1)


def test_plan_travels_as_json():
    assert FederatedPlan.from_json(PLAN.to_json()) == PLAN


def test_only_the_trunk_is_shared_and_the_adapter_survives_a_round():
    model = owner_network(PLAN, "key-1")
    shared, private = shared_state(model), private_state(model)
    assert shared and all(k.startswith(SHARED_PREFIX) for k in shared)
    assert private and all(k.startswith("adapters.") for k in private)
    assert set(shared) | set(private) == set(model.state_dict())
    with torch.no_grad():
        model.adapters[0].colour.mul_(-1)
    mine = private_state(model)
    other = owner_network(PLAN, "key-1")
    server = {k: v + 1 for k, v in shared_state(other).items()}
    load_states(model, server, mine)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in server.items())
    assert torch.equal(model.adapters[0].colour, mine["adapters.0.colour"])
    with pytest.raises(ValueError, match="lack"):
        load_states(model, {k: v for k, v in server.items() if "stem" not in k}, mine)


@pytest.mark.slow
def test_simulated_federation_keeps_adapters_at_the_owners(tmp_path):
    from orchestrator.federate import simulate
    from owners.client_app import OwnerSite, make_client_app

    classes = ("airplane", "automobile")
    plan = FederatedPlan(Task(classes),
                         TrainSettings(strategy="federated", epochs=2, batch_size=16, lr=0.003), rounds=2,
                         local_epochs=1)
    data = tmp_path / "data"
    for cls in classes:
        (data / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "test" / cls).iterdir()):
            (data / cls / f.name).symlink_to(f)
    sites = {}
    for i in range(2):
        key = OwnerKey(f"o{i}", bytes([i + 1]) * 32)
        for split in ("train", "test"):
            encrypt_folder(data, tmp_path / f"o{i}" / split, key,
                           EncryptSettings(task=Task(classes), split=split), progress=False)
        home = tmp_path / f"o{i}"
        sites[i] = OwnerSite(home / "train", home / "test", key, home / "state")
    checkpoint = simulate(plan, make_client_app(sites), 2, 2, tmp_path / "server")
    payload = torch.load(checkpoint, weights_only=False)
    assert [r["round"] for r in payload["rounds"]] == [1, 2]
    assert all(k.startswith(SHARED_PREFIX) for k in payload["state_dict"])
    for site in sites.values():
        adapter = torch.load(site.state_dir / f"adapter-{site.key.key_id}.pt", weights_only=False)
        model = owner_model(payload, adapter)
        truth = derive_schedule(site.key.secret, CipherGeometry(32, 32, 16, "color"))
        assert decode_adapter(model.adapters[0])["place"].tolist() == list(truth.source)  # started at the key's inverse
        blob = (site.state_dir / f"adapter-{site.key.key_id}.pt").read_bytes() + checkpoint.read_bytes()
        assert site.key.secret not in blob and site.key.secret.hex().encode() not in blob
        # every owner got the final trunk and predicts at home: trunk (the server's) + its own adapter
        trunk = torch.load(site.state_dir / "trunk.pt", weights_only=True)
        assert all(torch.equal(trunk["state_dict"][k], v) for k, v in payload["state_dict"].items())
        images = sorted((data / "airplane").iterdir())[:3] + sorted((data / "automobile").iterdir())[:3]
        results = predict_federated(site.key, [*images, tmp_path / "missing.jpg"], site.state_dir, top=2)
        assert [r.path for r in results] == [str(p) for p in [*images, tmp_path / "missing.jpg"]]
        assert all(r.error is None and {c for c, _ in r.top} == set(classes) for r in results[:-1])
        assert all(abs(sum(p for _, p in r.top) - 1) < 1e-4 for r in results[:-1])  # two classes: all the mass
        assert results[-1].error and not results[-1].top
        stranger = OwnerKey("x", b"a key this federation never saw!")
        with pytest.raises(OutboxError, match="adapter"):
            predict_federated(stranger, images, site.state_dir)
