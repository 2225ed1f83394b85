"""What the owner commands do with the privacy verdict: `broken` is refused by encrypt, upload and
predict unless --accept-cloud-can-decrypt, before anything is written or sent (real ingest and
prediction services on 127.0.0.1, the real CLI); `weak` warns and `holds` informs (per-image keys);
federate shows the verdict and refuses nothing; orchestrator check prints the owner's sentence; a
profile never keeps the acceptance."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from orchestrator.cli import main as orchestrator_main
from orchestrator.config import load_config, privacy_warning
from owners.audit import verdict_of
from owners.cipher import ACCEPT_FLAG, CipherGeometry, CloudCanDecrypt, privacy_gate
from owners.cli import main as owner_agent
from owners.federate import prepare_federation
from owners.keys import OwnerKey, create_key, keyring_dir
from owners.profile import ProfileError, load_profile, profiles_dir
from owners.upload import Connection, ServerTask
from protocol.privacy import MEASURED_ONE_IMAGE
from protocol.proto import ingest_pb2 as pb
from protocol.task import Task
from tests.test_audit import score
from tests.test_ingest import SAMPLE, TOKENS, catalog, server, stored_objects  # noqa: F401 - server is a fixture
from tests.test_predict_scale import KEY as PREDICT_KEY
from tests.test_predict_scale import TOKEN as PREDICT_TOKEN
from tests.test_predict_scale import service  # noqa: F401 - a module fixture: the real prediction service

ROOT = Path(__file__).resolve().parents[1]
CLASSES = tuple(sorted(p.name for p in SAMPLE.iterdir()))
REFUSED = f"Refused: nothing was written or sent. Pass {ACCEPT_FLAG}"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OWNER_AGENT_TOKEN", raising=False)
    return tmp_path / "home"


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_encrypt_is_refused_without_the_flag_and_writes_nothing(tmp_path, home, capsys):
    args = ["encrypt", "--key", "k", "--data", str(SAMPLE), "--out", str(tmp_path / "outbox"), "--no-progress"]
    assert owner_agent(args) == 1
    err = capsys.readouterr().err
    assert "PRIVACY VERDICT: broken." in err and REFUSED in err
    assert not (tmp_path / "outbox").exists() and not (keyring_dir() / "k.key").exists()  # not even a key
    assert owner_agent([*args, ACCEPT_FLAG]) == 0
    err = capsys.readouterr().err
    assert f"Accepted for this command with {ACCEPT_FLAG}" in err
    assert err.index("PRIVACY VERDICT") < err.index("outbox ready")
    assert (tmp_path / "outbox" / "manifest.json").exists()


def test_upload_is_refused_without_the_flag_and_sends_nothing(server, tmp_path, home, capsys):  # noqa: F811 - fixture
    token = token_file(tmp_path, TOKENS["hospital-a"])
    args = ["--key", "k", "--data", str(SAMPLE), "--server", server.addr, "--token-file", str(token), "--no-progress",
            "--split", "test"]
    assert owner_agent(args) == 1
    err = capsys.readouterr().err
    assert "PRIVACY VERDICT: broken. 32x32 color EtC in 16-pixel blocks" in err and REFUSED in err
    assert catalog(server, "SELECT COUNT(*) FROM datasets") == [(0,)] and stored_objects(server) == []
    assert not (home / "outbox").exists()
    assert owner_agent([*args, ACCEPT_FLAG]) == 0
    assert catalog(server, "SELECT owner, committed, images FROM datasets") == [("hospital-a", 1, 200)]


def test_the_old_flag_still_accepts_and_says_it_is_deprecated(server, tmp_path, home, capsys):  # noqa: F811 - fixture
    token = token_file(tmp_path, TOKENS["hospital-b"])
    assert owner_agent(["--key", "k", "--data", str(SAMPLE), "--server", server.addr, "--token-file", str(token),
                        "--no-progress", "--allow-weak-geometry"]) == 0
    assert f"--allow-weak-geometry is deprecated: it now means {ACCEPT_FLAG}" in capsys.readouterr().err
    assert catalog(server, "SELECT owner, committed FROM datasets") == [("hospital-b", 1)]


def test_predict_is_refused_without_the_flag_and_sends_no_image(service, tmp_path, home, capsys,  # noqa: F811 - fixture
                                                                caplog):
    create_key(PREDICT_KEY.name, PREDICT_KEY.secret)
    image = sorted((SAMPLE / "cat").iterdir())[0]
    args = ["predict", "--key", PREDICT_KEY.name, "--server", f"127.0.0.1:{service.port}", "--token-file",
            str(token_file(tmp_path, PREDICT_TOKEN)), "--no-progress", str(image)]
    caplog.set_level(logging.INFO, logger="orchestrator.serve")
    assert owner_agent(args) == 1
    assert REFUSED in capsys.readouterr().err
    assert not [r for r in caplog.records if "predictions" in r.getMessage()]  # no Predict reached the service
    assert owner_agent([*args, ACCEPT_FLAG]) == 0
    assert capsys.readouterr().out.split("\t")[1].split()[0] in ("cat", "dog")  # the path, then the top class
    answered = [r.getMessage() for r in caplog.records if "predictions" in r.getMessage()]
    assert answered == ["owner clinic: 1 predictions"]


def offer(**task) -> ServerTask:
    """A task as it arrives from a server: through the wire message, key_mode included."""
    return ServerTask.from_pb(Task(CLASSES, **task).to_pb(pb, "run-1", "clinic"))


@pytest.mark.parametrize("size,block,verdict", [(32, 16, "weak"), (32, 8, "holds"), (64, 16, "holds"),
                                                (224, 16, "weak")])
def test_per_image_keys_on_a_measured_colour_geometry_are_not_refused(size, block, verdict):
    shown = []
    offer(image_size=size, block_size=block, key_mode="per-image").checked_privacy(False, shown.append)
    assert len(shown) == 1 and shown[0].startswith(("warning: " if verdict == "weak" else "")
                                                   + f"PRIVACY VERDICT: {verdict}. ")
    assert "with a fresh key per image: attacking" in shown[0]
    # the same verdict as the audit's own thresholds give the measured row
    n, key, layout, exact, ssim = MEASURED_ONE_IMAGE[("color", size, block)]
    assert verdict_of(score(key=key, exact=exact, ssim=ssim, layout=layout)) == verdict


@pytest.mark.parametrize("task,words", [
    ({"scheme": "gray", "image_size": 64, "block_size": 8, "key_mode": "per-image"},
     "not measured one image at a time"),
    ({"image_size": 48, "block_size": 16, "key_mode": "per-image"}, "not measured one image at a time"),
    ({"block_size": 32, "key_mode": "per-image"}, "1 block(s)"),
    ({"block_size": 16}, "from 30 encrypted images of one key"),
])
def test_per_image_keys_where_nothing_is_measured_are_refused(task, words):
    shown = []
    with pytest.raises(CloudCanDecrypt, match=REFUSED) as refused:
        offer(**task).checked_privacy(False, shown.append)
    assert shown == [] and words in str(refused.value)


def test_federate_shows_the_verdict_and_refuses_nothing(server, tmp_path, home):  # noqa: F811 - pytest fixture
    shown = []
    key = OwnerKey("mine", bytes(range(32)))
    config = prepare_federation("mine", key, SAMPLE, None, Connection(server.addr, TOKENS["hospital-a"]), "key",
                                False, shown.append)
    verdict = [m for m in shown if m.startswith("PRIVACY VERDICT: broken.")]
    assert len(verdict) == 1 and "Not refused: federated training sends no images" in verdict[0]
    assert (Path(config["train"]) / "manifest.json").exists()  # encrypted here, for training here
    assert catalog(server, "SELECT COUNT(*) FROM datasets") == [(0,)]


def test_orchestrator_check_prints_the_owners_sentence(capsys):
    config = ROOT / "deploy" / "local-cpu.yaml"
    assert orchestrator_main(["check", str(config)]) == 0
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("PRIVACY VERDICT")]
    task = load_config(config).task
    with pytest.raises(CloudCanDecrypt) as refused:
        privacy_gate(CipherGeometry.for_task(task), task.key_mode, False, print)
    assert printed == [str(refused.value).split(". Refused: ")[0]]


@pytest.mark.parametrize("size,block", [(32, 16), (32, 8), (48, 16)])
def test_the_operator_and_the_owner_see_the_same_words_per_key_mode(size, block):
    for key_mode in ("owner", "per-image"):
        shown = []
        try:
            offer(image_size=size, block_size=block, key_mode=key_mode).checked_privacy(False, shown.append)
        except CloudCanDecrypt as exc:
            shown.append(str(exc).split(". Refused: ")[0])
        task = Task(CLASSES, size, block, "color", key_mode=key_mode)
        assert shown[0].removeprefix("warning: ") == privacy_warning(task)


def test_a_profile_never_keeps_the_acceptance(server, tmp_path, home, capsys):  # noqa: F811 - pytest fixture
    assert owner_agent(["join", server.addr, "--token-file", str(token_file(tmp_path, TOKENS["hospital-a"]))]) == 0
    assert owner_agent(["--key", "k", "--data", str(SAMPLE), "--split", "test", "--no-progress", ACCEPT_FLAG]) == 0
    saved = (profiles_dir() / "default.json").read_text()
    assert "accept" not in saved
    capsys.readouterr()
    assert owner_agent(["--key", "k", "--data", str(SAMPLE), "--split", "train", "--no-progress"]) == 1
    assert REFUSED in capsys.readouterr().err
    assert catalog(server, "SELECT split FROM datasets") == [("test",)]  # the second upload sent nothing
    # nor can a hand-edited profile carry it: a field the profile does not know is refused
    doc = json.loads(saved)
    (profiles_dir() / "default.json").write_text(json.dumps({**doc, "accept_cloud_can_decrypt": True}))
    with pytest.raises(ProfileError, match="malformed"):
        load_profile("default")
