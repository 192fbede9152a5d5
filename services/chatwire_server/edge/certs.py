"""A local certificate authority and certificates signed by it, for trying TLS and mutual TLS on one machine
(`make certs`) and for the tests. Never for production: the CA's key sits beside its certificate.

`python -m chatwire_server.edge.certs DIR` writes into DIR (created, mode 700):
  ca.pem, ca-key.pem           the CA (ECDSA P-256, 1 year)
  server.pem, server-key.pem   for the edge and the replicas: DNS localhost, IP 127.0.0.1 (and any --host)
  client.pem, client-key.pem   for Envoy and internal callers: URI spiffe://chatwire.local/client, CN chatwire-client
Existing files are kept unless --force.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
CLIENT_SPIFFE_ID = "spiffe://chatwire.local/client"


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_path.write_bytes(self.cert)
        key_path.write_bytes(self.key)
        key_path.chmod(0o600)
        return cert_path, key_path


class Authority:
    """A CA that signs server and client certificates."""

    def __init__(self, name: str = "chatwire local CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> Issued:
        return Issued(self.certificate.public_bytes(serialization.Encoding.PEM), _key_pem(self._key))

    def issue(
        self,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        server: bool = True,
        client: bool = True,
    ) -> Issued:
        """A leaf certificate for `hosts` (DNS names or IP addresses) and `uris` (SPIFFE ids)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_local_set(directory: Path, hosts: tuple[str, ...] = (), force: bool = False) -> None:
    """The CA, a server and a client certificate in `directory` (see the module's doc)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if (directory / "ca.pem").exists() and not force:
        print(f"{directory}: certificates exist (--force makes new ones)")
        return
    authority = Authority()
    authority.pem.write(directory, "ca")
    authority.issue("localhost", hosts=("localhost", "127.0.0.1", *hosts)).write(directory, "server")
    authority.issue("chatwire-client", uris=(CLIENT_SPIFFE_ID,), server=False).write(directory, "client")
    print(f"{directory}: ca.pem, server.pem, client.pem (and their keys), valid for {VALIDITY.days} days")


def main() -> None:
    parser = argparse.ArgumentParser(description="A local CA and TLS certificates for chatwire (not for production)")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--host", action="append", default=[], help="another name or address for the server")
    parser.add_argument("--force", action="store_true", help="replace existing certificates")
    args = parser.parse_args()
    write_local_set(args.directory, tuple(args.host), args.force)


if __name__ == "__main__":
    main()
