"""Keyring semantics: creation on first use, file permissions, key files, passphrases."""
import io
import json
import os
import stat

import pytest

from owners import cli
from owners.keys import (
    KeyringError,
    OwnerKey,
    derive_from_passphrase,
    key_id_of,
    keyring_dir,
    list_keys,
    read_key_file,
    resolve_key,
)


@pytest.fixture(autouse=True)
def owner_home(tmp_path, monkeypatch):
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_first_use_creates_a_private_key_and_reuses_it(owner_home):
    key, created = resolve_key("alice")
    assert created
    path = owner_home / "keys" / "alice.key"
    assert key.path == path and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, created_again = resolve_key("alice")
    assert not created_again
    assert again.secret == key.secret and again.key_id == key.key_id
    assert len(key.secret) == 32
    assert resolve_key("bob")[0].secret != key.secret


def test_key_readable_by_others_is_refused(owner_home):
    key, _ = resolve_key("alice")
    os.chmod(key.path, 0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        resolve_key("alice")


def test_key_file_path_and_missing_names(tmp_path):
    key, _ = resolve_key("alice")
    by_path, created = resolve_key(str(key.path))
    assert not created and by_path.secret == key.secret
    with pytest.raises(KeyringError, match="does not exist"):
        resolve_key(str(tmp_path / "nope.key"))
    with pytest.raises(KeyringError, match="no key named 'carol'"):
        resolve_key("carol", create=False)
    with pytest.raises(KeyringError, match="invalid key name"):
        resolve_key("bad name!")


def test_malformed_or_tampered_key_file(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not json")
    bad.chmod(0o600)
    with pytest.raises(KeyringError, match="malformed"):
        read_key_file(bad)
    key, _ = resolve_key("alice")
    doc = json.loads(key.path.read_text())
    doc["secret"] = "00" * 32
    tampered = tmp_path / "tampered.key"
    tampered.write_text(json.dumps(doc))
    tampered.chmod(0o600)
    with pytest.raises(KeyringError, match="recorded key id does not match"):
        read_key_file(tampered)


def test_secret_never_in_repr():
    key = OwnerKey("k", bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(key) and "secret" not in repr(key)


def test_key_id_is_a_fixed_hmac_fingerprint():
    assert key_id_of(bytes(range(32))) == "a171afe6189a9e44"
    assert key_id_of(bytes(32)) != key_id_of(bytes(range(32)))


def test_passphrase_keys_are_reproducible_and_salted():
    a = derive_from_passphrase("correct horse battery staple", "hospital-a")
    assert a == derive_from_passphrase("correct horse battery staple", "hospital-a")
    assert a != derive_from_passphrase("correct horse battery staple", "hospital-b")
    assert len(a) == 32
    with pytest.raises(KeyringError, match="too short"):
        derive_from_passphrase("short", "x")


def test_keygen_from_stdin_and_file_and_keys_listing(monkeypatch, capsys, tmp_path):
    phrase = "a long enough passphrase 12345"
    monkeypatch.setattr("sys.stdin", io.StringIO(phrase + "\n"))
    assert cli.main(["keygen", "hosp", "--passphrase-stdin"]) == 0
    out = capsys.readouterr()
    assert "NEW KEY CREATED" in out.err
    phrase_file = tmp_path / "phrase.txt"
    phrase_file.write_text(phrase + "\n")
    phrase_file.chmod(0o644)  # a passphrase file is checked like a key file
    assert cli.main(["keygen", "hosp2", "--passphrase-file", str(phrase_file), "--salt", "hosp"]) == 1
    assert "passphrase file" in capsys.readouterr().err and "chmod 600" not in str(list_keys())
    phrase_file.chmod(0o600)
    assert cli.main(["keygen", "hosp2", "--passphrase-file", str(phrase_file), "--salt", "hosp"]) == 0
    keys = {k.name: k for k in list_keys()}
    # same passphrase and salt -> same key, whichever way it was read
    assert keys["hosp"].secret == keys["hosp2"].secret == derive_from_passphrase(phrase, "hosp")
    capsys.readouterr()
    assert cli.main(["keys"]) == 0
    listing = capsys.readouterr().out
    assert "hosp\t" + keys["hosp"].key_id in listing
    assert keys["hosp"].secret.hex() not in listing
    # keygen never overwrites an existing key
    assert cli.main(["keygen", "hosp"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert keyring_dir() == tmp_path / "home" / "keys"


def test_the_same_passphrase_in_nfc_and_nfd_gives_the_same_key():
    import unicodedata

    phrase = "Zürich café résumé 2026"
    nfc, nfd = unicodedata.normalize("NFC", phrase), unicodedata.normalize("NFD", phrase)
    assert nfc != nfd
    assert derive_from_passphrase(nfc, "salt") == derive_from_passphrase(nfd, "salt")
    assert derive_from_passphrase(nfc, "café") == derive_from_passphrase(nfc, unicodedata.normalize("NFD", "café"))


def test_bad_key_and_passphrase_files_are_one_line_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("OWNER_AGENT_HOME", str(tmp_path / "home"))
    listed = tmp_path / "list.key"
    listed.write_text("[1, 2, 3]")
    listed.chmod(0o600)
    with pytest.raises(KeyringError, match="malformed"):
        read_key_file(listed)
    assert cli.main(["keygen", "k", "--passphrase-file", str(tmp_path / "missing.txt")]) == 1
    assert capsys.readouterr().err.strip().endswith(f"passphrase file {tmp_path / 'missing.txt'} does not exist")
