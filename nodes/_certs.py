"""A small certificate authority for the MQTT uplink (and the simulators): a CA, server
certificates with host names, client certificates whose CN is the device id.

`flowrun certs init DIR --host NAME` and `flowrun certs device DIR DEVICE_ID` are the
command line (`main`). Keys are EC P-256, written with mode 0600 and never printed.
Mosquitto's `use_identity_as_username` makes a client certificate's CN the MQTT user name,
so the broker ACL `pattern write energy/%u/#` lets a device write its own topics only.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
# a device id becomes a CN, a file name and an MQTT topic level: no '/', '+', '#', spaces
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """The CA in a directory: `ca.crt` and `ca.key`, created once and reused."""

    def __init__(
        self,
        directory: Path,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        cert_path: Path,
    ) -> None:
        self.directory = directory
        self.key = key
        self.cert = cert
        self.cert_path = cert_path

    @classmethod
    def load_or_create(
        cls,
        directory: Path,
        name: str = "flowrun CA",
        days: int = 3650,
        files: tuple[str, str] = (CA_CERT, CA_KEY),
    ) -> Authority:
        """The CA whose certificate and key are `files` in `directory`; made if missing
        (reused otherwise: clients may already trust it)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / files[0], directory / files[1]
        if cert_path.exists() and key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: not an EC private key")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return cls(directory, key, cert, cert_path)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, key_pem(key))
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert, cert_path)

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        hosts: Sequence[str] = (),
        days: int = 825,
        stem: str | None = None,
        paths: tuple[Path, Path] | None = None,
    ) -> Issued:
        """A leaf certificate for `common_name` (server: with `hosts` as SANs; client: the
        CN is the identity), written as `<stem>.crt` and `<stem>.key` beside the CA, or to
        `paths` (certificate, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        stem = stem or common_name
        cert_path, key_path = paths or (
            self.directory / f"{stem}.crt",
            self.directory / f"{stem}.key",
        )
        out = Issued(cert_path, key_path)
        write_private(out.key, key_pem(key))
        write_public(out.cert, cert.public_bytes(serialization.Encoding.PEM))
        return out


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the start (never world-readable, not even for a moment)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# the command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="flowrun certs",
        description="Certificates for the MQTT uplink: a CA with a server certificate, and "
        "a client certificate per device (CN = device id). Keys are written with mode 0600.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the CA (if missing) and a server certificate")
    init.add_argument("dir", type=Path, help="directory for ca.crt, ca.key, server.crt, ...")
    init.add_argument(
        "--host",
        action="append",
        required=True,
        help="the broker's host name or IP address as devices reach it (repeatable)",
    )
    init.add_argument("--days", type=int, default=825, help="server certificate validity")
    dev = sub.add_parser("device", help="issue a client certificate whose CN is DEVICE_ID")
    dev.add_argument("dir", type=Path, help="the directory `certs init` made")
    dev.add_argument("device_id", help="the device id: letters, digits, '.', '_', '-'")
    dev.add_argument("--days", type=int, default=825, help="validity in days")
    args = p.parse_args(argv)

    if args.command == "init":
        ca = Authority.load_or_create(args.dir)
        server = ca.issue(args.host[0], server=True, hosts=args.host, days=args.days, stem="server")
        print(f"CA:     {ca.cert_path}")
        print(f"server: {server.cert} (key {server.key}) for {', '.join(args.host)}")
        return 0
    if not DEVICE_ID.fullmatch(args.device_id):
        print(
            f"flowrun certs: {args.device_id!r} is not a device id (1-64 of letters, digits, "
            "'.', '_', '-'; it becomes an MQTT topic level)",
            file=sys.stderr,
        )
        return 2
    if not (args.dir / CA_CERT).exists():
        print(
            f"flowrun certs: no CA in {args.dir}; run `flowrun certs init` first", file=sys.stderr
        )
        return 2
    ca = Authority.load_or_create(args.dir)
    issued = ca.issue(args.device_id, server=False, days=args.days)
    print(f"device {args.device_id}: {issued.cert} (key {issued.key}), CA {ca.cert_path}")
    return 0
