"""TLS for the egress proxy's hosts with credentials: the proxy ends the kernel's TLS itself,
with a certificate for that host from the gateway's own egress authority, adds the host's
credentials to each request, and talks TLS to the host, verifying its certificate.

The authority (an EC P-256 key and a self-signed CA certificate, in ``<data>/egress-ca``, the
key mode 0600) is made once and kept. Kernels trust it through the bundle the proxy writes beside
its socket (``kernel_bundle``: the public CA roots, the operator's ``egress_trust`` file, the
authority's certificate); only hosts with credentials are answered with its certificates, the
others are plain tunnels with the host's own. Neither the key nor any credential is in a
kernel's reach.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
import threading
import time
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

AUTHORITY_NAME = "agent-gateway egress authority"
KEY_FILE, CERT_FILE = "ca.key", "ca.pem"
LEAF_DAYS = 7
LEAF_RENEW_SECONDS = 24 * 3600  # a cached leaf is replaced a day before it expires


class Authority:
    """The gateway's egress certificate authority, and the TLS contexts made from it."""

    def __init__(self, directory: Path, trust_file: str | None = None):
        self.directory = directory
        self.trust_file = trust_file
        self.key, self.certificate = self._load_or_create()
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.upstream = ssl.create_default_context()
        if trust_file:
            self.upstream.load_verify_locations(cafile=trust_file)
        self._leaves: dict[str, tuple[ssl.SSLContext, float]] = {}
        self._lock = threading.Lock()

    def _load_or_create(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key_path, cert_path = self.directory / KEY_FILE, self.directory / CERT_FILE
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key")
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if certificate.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc) + \
                    datetime.timedelta(days=LEAF_DAYS):
                return key, certificate
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AUTHORITY_NAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        _write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        return key, certificate

    def server_context(self, host: str) -> ssl.SSLContext:
        """A context presenting a certificate for ``host`` signed by this authority (cached)."""
        with self._lock:
            cached = self._leaves.get(host)
            if cached is not None and cached[1] > time.time():
                return cached[0]
            context = self._leaf_context(host)
            self._leaves[host] = (context, time.time() + LEAF_DAYS * 24 * 3600 - LEAF_RENEW_SECONDS)
            return context

    def _leaf_context(self, host: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        try:
            alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alternative = x509.DNSName(host)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        pem = (certificate.public_bytes(serialization.Encoding.PEM)
               + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
        # load_cert_chain reads files only: a private file of the server's, removed at once.
        fd, path = tempfile.mkstemp(dir=self.directory, prefix=".leaf-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
        return context


def _write_private(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    os.replace(partial, path)


def kernel_bundle(trust_file: str | None, authority: Authority | None) -> bytes:
    """The CA certificates a sandboxed kernel trusts (it sees none of the host's): the public
    roots, the operator's ``egress_trust`` and, when there is one, the egress authority."""
    parts = [Path(certifi.where()).read_bytes()]
    if trust_file:
        parts.append(Path(trust_file).read_bytes())
    if authority is not None:
        parts.append(authority.certificate_pem)
    return b"".join(part.rstrip(b"\n") + b"\n" for part in parts)
