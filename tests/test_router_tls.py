"""The public endpoint over TLS (issue 14): ``splitserve router --tls-cert-file/--tls-key-file``
serves HTTPS, and the openai client completes through it against a certificate it trusts."""

from __future__ import annotations

import datetime as dt
import ipaddress

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from services import stub_router
from splitserve.router.config import RouterConfig

pytestmark = pytest.mark.timeout(120)


def self_signed(tmp_path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_router_serves_https_to_the_openai_client(demo_model, tmp_path) -> None:
    from openai import OpenAI

    cert, key = self_signed(tmp_path)
    with stub_router(demo_model, "--tls-cert-file", cert, "--tls-key-file", key,
                     scheme="https", verify=cert) as (url, _):
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is refused
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused",
                        http_client=httpx.Client(verify=cert), max_retries=0)
        got = client.completions.create(model="demo", prompt="hello", max_tokens=3)
        assert got.choices[0].finish_reason in ("length", "stop")


def test_tls_files_go_together_and_must_exist(tmp_path) -> None:
    with pytest.raises(ValueError, match="together"):
        RouterConfig(served_model_name="m", model_dir=".", tls_cert_file=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="does not exist"):
        RouterConfig(served_model_name="m", model_dir=".", tls_cert_file=str(tmp_path / "c"),
                     tls_key_file=str(tmp_path / "k"))
