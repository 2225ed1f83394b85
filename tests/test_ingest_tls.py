"""TLS and mutual TLS on the ingest service, with certificates made here for 127.0.0.1."""
import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.config import ConfigError, parse_config
from orchestrator.ingest import start_ingest
from owners.encrypt import EncryptSettings, encrypt_folder
from owners.upload import Connection, IngestClient, ServiceError, upload_outbox
from protocol.task import Task
from tests.test_ingest import CLASSES, KEY_A, SAMPLE, TOKENS, config_dict


def _cert(name, key, issuer_name, issuer_key, ca=False, server=False):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert, key) -> tuple[Path, Path]:
    c, k = folder / f"{stem}.pem", folder / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = _cert("test CA", ca_key, ca_name, ca_key, ca=True)
    ca_pem, _ = _write(folder, "ca", ca, ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _write(folder, "server", _cert("127.0.0.1", server_key, ca_name, ca_key, server=True), server_key)
    client = _write(folder, "client", _cert("hospital-a", client_key, ca_name, ca_key), client_key)
    outbox = folder / "outbox"
    encrypt_folder(SAMPLE, outbox, KEY_A, EncryptSettings(task=Task(tuple(CLASSES)), split="test"), progress=False)
    return {"ca": ca_pem, "server": server, "client": client, "outbox": outbox}


def tls_server(tmp_path, pki, mutual):
    data = config_dict(tmp_path / "store")
    data["ingest"].pop("insecure_loopback")
    data["ingest"]["tls"] = {"cert": str(pki["server"][0]), "key": str(pki["server"][1])}
    if mutual:
        data["ingest"]["tls"]["client_ca"] = str(pki["ca"])
    return start_ingest(parse_config(data), listen="127.0.0.1:0")


def connect(service, **kw) -> IngestClient:
    return IngestClient(Connection(f"127.0.0.1:{service.port}", TOKENS["hospital-a"], retries=2, **kw),
                        log=lambda m: None)


def test_tls_upload(tmp_path, pki):
    service = tls_server(tmp_path, pki, mutual=False)
    try:
        assert upload_outbox(pki["outbox"], connect(service, ca_file=pki["ca"])).committed
        with pytest.raises(ServiceError):  # plaintext against a TLS server fails
            upload_outbox(pki["outbox"], connect(service))
    finally:
        service.stop(0)


def test_mutual_tls_needs_a_client_certificate(tmp_path, pki):
    service = tls_server(tmp_path, pki, mutual=True)
    try:
        with pytest.raises(ServiceError):
            connect(service, ca_file=pki["ca"]).get_task()
        client = connect(service, ca_file=pki["ca"], client_cert=pki["client"][0], client_key=pki["client"][1])
        assert client.get_task().owner_id == "hospital-a"
    finally:
        service.stop(0)


def test_tokens_without_tls_off_loopback_are_refused(tmp_path):
    data = config_dict(tmp_path / "store", listen="0.0.0.0:50051")
    data["ingest"]["insecure_loopback"] = False
    with pytest.raises(ConfigError, match="ingest.tls"):
        parse_config(data)
    cfg = parse_config(config_dict(tmp_path / "store"))
    with pytest.raises(ConfigError, match="off loopback"):
        start_ingest(cfg, listen="0.0.0.0:0")
