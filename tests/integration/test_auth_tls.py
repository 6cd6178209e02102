"""Authenticated, encrypted NATS: a server that requires a user/password and TLS refuses an
anonymous client, while the services and their agents run a workflow with credentials."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jetreduce.cli.host import ServiceHost
from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import EmbeddedServer
from jetreduce.runtime.connection import ConnectFailed, connect
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio


def _certs(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jetreduce test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.slow  # a workflow on a TLS server: not in `make test-fast`
async def test_auth_and_tls_required_and_honoured(tmp_path: Path) -> None:
    ca, cert, key = _certs(tmp_path)
    password = "s3cret-canary-pw"
    server = EmbeddedServer(
        tmp_path / "nats",
        extra_args=[
            "--user",
            "jr",
            "--pass",
            password,
            "--tls",
            "--tlscert",
            str(cert),
            "--tlskey",
            str(key),
        ],
    )
    server.start()
    try:
        url = server.url.replace("nats://", "tls://")
        with pytest.raises(ConnectFailed):
            await connect(NatsSettings(url=url, tls_ca=str(ca)), forever=False, timeout_s=2)
        with pytest.raises(ConnectFailed):
            await connect(
                NatsSettings(url=url, user="jr", password="wrong", tls_ca=str(ca)),
                forever=False,
                timeout_s=2,
            )
        settings = NatsSettings(
            url=url, user="jr", password=password, tls_ca=str(ca), prefix="auth"
        )
        assert password not in repr(settings)
        host = ServiceHost(settings, log_dir=tmp_path / "logs")
        async with host.running():
            nc = await connect(settings, forever=False)
            seen: list[bytes] = []

            async def record(msg: object) -> None:
                seen.append(getattr(msg, "data", b""))

            await nc.subscribe(">", cb=record)
            subjects = Subjects("auth")
            watcher = Watcher(nc, subjects, "auth-1", show_events=False, tty=False)
            await watcher.start()
            text = (
                "name: auth\nmap:\n  input: \"echo '[1, 2, 3]'\"\n  agent_template:\n"
                '    - shell: "echo ${item}"\nreduce:\n  - shell: "echo ${map.successful}"\n'
            )
            await submit(
                nc,
                subjects,
                text,
                ev.SubmitOptions(workdir=str(tmp_path)),
                workflow_id="auth-1",
                source="t",
            )
            done = await watcher.until_done(120)
            await nc.close()
        assert isinstance(done, ev.WorkflowCompleted), done
        assert done.reduce_output == "3"
        assert seen and not any(password.encode() in data for data in seen)
        for log in (tmp_path / "logs").rglob("*.log"):
            assert password not in log.read_text()
    finally:
        server.stop()
