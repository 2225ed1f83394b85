"""`owner-agent join` then the README's first line, `owner-agent --key mykey --data ./imgs`, with a real
ingest service on 127.0.0.1: the profile remembers the server, keeps the token out of the profile's
JSON and private, and flags still override it."""
from __future__ import annotations

import json
import stat

import pytest

from owners.cli import main as owner_agent
from owners.profile import list_profiles, profiles_dir
from tests.test_ingest import SAMPLE, TOKENS, catalog, server  # noqa: F401 - server is a fixture


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OWNER_AGENT_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text(TOKENS["hospital-a"] + "\n")
    token.chmod(0o600)
    return token


def test_join_then_the_readme_command_uploads(server, home, tmp_path, capsys):  # noqa: F811 - pytest fixture
    assert owner_agent(["join", server.addr, "--token-file", str(home)]) == 0
    assert "joined" in capsys.readouterr().err and list_profiles() == ["default"]
    saved = profiles_dir() / "default.json"
    assert TOKENS["hospital-a"] not in saved.read_text()  # the token lives in its own private file
    for path in (saved, profiles_dir() / "default.token", profiles_dir()):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    home.unlink()  # the profile does not depend on the file the token came from

    assert owner_agent(["--key", "mykey", "--data", str(SAMPLE), "--no-progress", "--accept-cloud-can-decrypt"]) == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the upload's summary line
    assert catalog(server, "SELECT owner, committed, images FROM datasets") == [("hospital-a", 1, 200)]


def test_join_checks_the_token_first_and_saves_nothing_when_refused(server, home, tmp_path):  # noqa: F811 - pytest fixture
    home.write_text("not-a-token")
    assert owner_agent(["join", server.addr, "--token-file", str(home)]) == 1
    assert list_profiles() == []


def test_without_server_or_profile_the_error_says_to_join(home, capsys):
    assert owner_agent(["--key", "mykey", "--data", str(SAMPLE)]) == 1
    assert "owner-agent join SERVER --token-file" in capsys.readouterr().err


def test_named_profiles_and_flags_override(server, home, tmp_path, capsys):  # noqa: F811 - pytest fixture
    assert owner_agent(["join", "127.0.0.1:1", "--token-file", str(home), "--profile", "dead"]) == 1  # nobody there
    assert owner_agent(["join", server.addr, "--token-file", str(home), "--profile", "lab"]) == 0
    assert list_profiles() == ["lab"]
    # the profile's server, with --server overriding it: a dead address fails, the real one works
    assert owner_agent(["--key", "k", "--data", str(SAMPLE), "--profile", "lab", "--no-progress",
                        "--accept-cloud-can-decrypt", "--split", "test"]) == 0
    assert owner_agent(["--key", "k", "--data", str(SAMPLE), "--profile", "lab", "--server", "127.0.0.1:1",
                        "--token-file", str(home), "--retries", "1", "--no-progress",
                        "--accept-cloud-can-decrypt"]) == 1
