"""HTTPS through the egress proxy: a host with credentials has its TLS ended by the proxy (a
certificate of the gateway's egress authority, the host's own verified upstream, the token
added inside); a host without is a plain tunnel showing its own certificate; a host whose
certificate is not trusted is refused. Against real TLS servers on loopback with a CA the test
makes, and a sandboxed session installing over HTTPS from such an index."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.egress import BUNDLE_NAME, DIRECTORY, Connection, Policy, Proxy
from gateway.egress_tls import AUTHORITY_NAME, Authority, kernel_bundle
from tests.conftest import engine_args, isolated_gateway, run
from tests.test_egress import INDEX_TOKEN, Index, events_of, index_credentials, token_hunt
from tests.test_environments import build_wheel


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                  critical=True)
                   .sign(key, hashes.SHA256()))
    return key, certificate


def server_files(directory: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], name: str) -> Path:
    """A PEM file with a certificate for 127.0.0.1 issued by ``ca`` and its key."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca[1].subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(ca[0], hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


class TlsIndex(Index):
    """The token-checking index of ``tests.test_egress``, over HTTPS."""

    def __init__(self, wheels: Path, chain: Path):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain)
        self.context = context
        super().__init__(wheels)

    def server_bind(self) -> None:
        super().server_bind()
        self.socket = self.context.wrap_socket(self.socket, server_side=True)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A CA the operator trusts (its file), an index with a certificate from it and a token, a
    second one without credentials, and a third whose certificate no one trusts."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "tinypkg", "1.0", "VALUE = 42\n")
    trusted, stranger = make_ca("test private CA"), make_ca("a CA no one trusts")
    trust_file = tmp_path / "trust.pem"
    trust_file.write_bytes(trusted[1].public_bytes(serialization.Encoding.PEM))
    servers = {"index": TlsIndex(wheels, server_files(tmp_path, trusted, "index")),
               "plain": TlsIndex(wheels, server_files(tmp_path, trusted, "plain")),
               "untrusted": TlsIndex(wheels, server_files(tmp_path, stranger, "untrusted"))}
    yield {"trust_file": trust_file, **servers}
    for server in servers.values():
        server.stop()


async def connect_through(socket_path: Path, port: int, cadata: str) -> tuple[bytes, Any, Any]:
    """CONNECT to 127.0.0.1:port through the proxy, then TLS with a client trusting ``cadata``;
    returns the proxy's answer and the stream (None when it refused)."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if not answer.startswith(b"HTTP/1.1 200"):
        answer += await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer, None, None
    await writer.start_tls(ssl.create_default_context(cadata=cadata), server_hostname="127.0.0.1")
    return answer, reader, writer


async def get(reader: Any, writer: Any, port: int, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer guessed\r\n\r\n".encode())
    return await asyncio.wait_for(reader.read(), 10)


def issuer_of(writer: Any) -> str:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).issuer.rfc4514_string()


def test_the_proxy_ends_tls_only_for_hosts_with_credentials_and_verifies_the_host(
        tmp_path: Path, pki: dict[str, Any]) -> None:
    index, plain, untrusted = pki["index"], pki["plain"], pki["untrusted"]
    authority = Authority(tmp_path / "data" / "egress-ca", str(pki["trust_file"]))
    credentials = {f"127.0.0.1:{port}": {"Authorization": f"Bearer {INDEX_TOKEN}"}
                   for port in (index.port, untrusted.port)}
    runtime = tmp_path / "runtime"
    runtime.mkdir()

    async def scenario() -> tuple[list[Any], list[Connection], str]:
        seen: list[Connection] = []
        proxy = Proxy(runtime, Policy.parse([f"127.0.0.1:{s.port}" for s in (index, plain, untrusted)]), credentials,
                      sink=seen.append, authority=authority,
                      bundle=kernel_bundle(str(pki["trust_file"]), authority))
        await proxy.start()
        try:
            bundle = (runtime / DIRECTORY / BUNDLE_NAME).read_text()
            results: list[Any] = []
            answer, reader, writer = await connect_through(proxy.socket_path, index.port, bundle)
            results.append((answer, issuer_of(writer), await get(reader, writer, index.port, "/simple/tinypkg/")))
            answer, reader, writer = await connect_through(proxy.socket_path, plain.port, bundle)
            results.append((answer, issuer_of(writer), await get(reader, writer, plain.port, "/simple/tinypkg/")))
            results.append(await connect_through(proxy.socket_path, untrusted.port, bundle))
            await asyncio.sleep(0.2)
        finally:
            proxy.close()
        return results, seen, bundle

    (intercepted, tunnel, refused), seen, bundle = asyncio.run(scenario())
    # The host with credentials: answered with the gateway's authority's certificate, the
    # kernel's guessed token replaced by the operator's, the index's answer passed on.
    assert intercepted[0].startswith(b"HTTP/1.1 200")
    assert intercepted[1] == f"CN={AUTHORITY_NAME}"
    assert intercepted[2].startswith(b"HTTP/1.0 200") and b"tinypkg-1.0-py3-none-any.whl" in intercepted[2]
    assert index.seen == [("/simple/tinypkg/", f"Bearer {INDEX_TOKEN}")]
    # A host without credentials: a tunnel, its own certificate, nothing added.
    assert tunnel[1] == "CN=test private CA" and tunnel[2].startswith(b"HTTP/1.0 401")
    assert plain.seen == [("/simple/tinypkg/", "Bearer guessed")]
    # Credentials for a host whose certificate is not trusted: refused before anything is sent.
    assert refused[0].startswith(b"HTTP/1.1 502") and b"not trusted" in refused[0], refused[0]
    assert untrusted.seen == []
    by_port = {c.port: c for c in seen}
    assert by_port[index.port].allowed and by_port[index.port].credentials
    assert by_port[index.port].bytes_received > 100 and by_port[index.port].method == "CONNECT"
    assert by_port[plain.port].allowed and not by_port[plain.port].credentials
    assert not by_port[untrusted.port].allowed and "not trusted" in by_port[untrusted.port].reason
    assert all(INDEX_TOKEN not in json.dumps(c.details()) for c in seen)
    # What the kernel trusts: the public roots, the operator's CA and the authority; never a key.
    assert bundle.count("BEGIN CERTIFICATE") > 50 and "PRIVATE KEY" not in bundle
    assert authority.certificate_pem.decode() in bundle and pki["trust_file"].read_text() in bundle
    key_file = tmp_path / "data" / "egress-ca" / "ca.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["ca.key", "ca.pem"]  # no leaf left behind
    again = Authority(tmp_path / "data" / "egress-ca")  # kept across restarts, not made anew
    assert again.certificate_pem == authority.certificate_pem


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["sandbox", "container"])
def test_a_sandboxed_session_installs_over_https_from_a_private_index_whose_token_it_never_sees(
        request: pytest.FixtureRequest, pki: dict[str, Any], profile: str) -> None:
    engine = engine_args(request, profile)
    index = pki["index"]
    with index_credentials(index) as credentials:
        trust_file = credentials.parent / "trust.pem"
        trust_file.write_bytes(pki["trust_file"].read_bytes())
        trust_file.chmod(0o644)
        with isolated_gateway(profile, "--egress-credentials", str(credentials), "--egress-trust",
                              str(trust_file), "--pool-size", "0", *engine) as state:
            with state["gateway"].client() as http:
                plain = pki["plain"]
                created = http.post("/v1/sessions", json={"egress": [f"127.0.0.1:{index.port}",
                                                                     f"127.0.0.1:{plain.port}"]})
                assert created.status_code == 201, created.text
                sid = created.json()["id"]
                installed = run(http, sid, f"%pip install --index-url https://127.0.0.1:{index.port}/simple tinypkg")
                assert installed["status"] == "ok", installed
                assert "Successfully installed tinypkg-1.0" in installed["stdout"]
                assert run(http, sid, "import tinypkg; print(tinypkg.VALUE)")["stdout"] == "42\n"
                assert index.seen and all(auth == f"Bearer {INDEX_TOKEN}" for _, auth in index.seen)
                allowed = [e["details"] for e in events_of(http, sid, "egress") if e["details"]["allowed"]]
                assert allowed and all(e["method"] == "CONNECT" and e["credentials"] for e in allowed)
                # A host without credentials, over HTTPS with Python's own ssl (the host's certificate,
                # from the operator's CA, verified in the kernel): the tunnel reaches it, nothing added.
                tunnel = run(http, sid, "\n".join([
                    "import urllib.request, urllib.error",
                    f"try:\n    urllib.request.urlopen('https://127.0.0.1:{plain.port}/simple/tinypkg/', timeout=10)",
                    "except urllib.error.HTTPError as e:\n    print(e.code)"]))
                assert tunnel["stdout"] == "401\n", tunnel
                assert plain.seen == [("/simple/tinypkg/", None)]

                data_dir = state["base"] / "data"
                hunt = run(http, sid, "\n".join([
                    token_hunt(),
                    "bundle = open(os.environ['SSL_CERT_FILE'], 'rb').read()",
                    "found += ['the bundle holds a key'] if b'PRIVATE KEY' in bundle or needle.encode() in bundle else []",
                    f"for secret in ({str(data_dir / 'egress-ca' / 'ca.key')!r}, {str(credentials)!r}):",
                    "    try:\n        open(secret, 'rb').read()\n        found.append(secret)",
                    "    except OSError:\n        pass",
                    "print(found, bundle.count(b'BEGIN CERTIFICATE') > 50)"]))
                assert hunt["status"] == "ok" and hunt["stdout"] == "[] True\n", hunt
