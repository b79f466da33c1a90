"""A small private CA for one jetfed deployment: the broker's server cert and per-client certs.

The broker and every client trust only this CA, so a device needs no public PKI and a stolen
device cert is useless against any other deployment.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jetfed.edge.errors import UserError

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
KEY_TYPES = ("ec", "rsa")
SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644


@dataclass(frozen=True)
class KeyPair:
    """A private key and the certificate for it."""

    key: PrivateKey
    cert: x509.Certificate


def new_private_key(key_type: str) -> PrivateKey:
    """EC P-256 (small, fast on a Jetson) or RSA 2048 (for old TLS stacks)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise UserError(f"--key-type must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jetfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    days: int,
    not_after_limit: Optional[datetime.datetime] = None,
) -> x509.CertificateBuilder:
    """Backdated 5 minutes for clock skew; never valid past `not_after_limit` (the CA's end)."""
    start = utc_now() - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)
    if not_after_limit is not None:
        end = min(end, not_after_limit)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def new_ca(key_type: str, days: int) -> KeyPair:
    """A self-signed CA that may sign leaf certs only (path length 0)."""
    key = new_private_key(key_type)
    name = _name("jetfed deployment CA")
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(key, cert)


def _leaf_key_usage(key_type: str) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_type == "rsa",
        data_encipherment=False,
        key_agreement=key_type == "ec",
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    ca: KeyPair,
    common_name: str,
    key_type: str,
    days: int,
    usage: x509.ObjectIdentifier,
    alt_names: List[x509.GeneralName],
) -> KeyPair:
    key = new_private_key(key_type)
    builder = (
        _builder(_name(common_name), ca.cert.subject, key, days, ca.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key_type), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return KeyPair(key, builder.sign(ca.key, hashes.SHA256()))


def host_alt_name(host: str) -> x509.GeneralName:
    """An IP SAN for an address, a DNS SAN for a name (clients check the one they dial)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(ca: KeyPair, hosts: List[str], key_type: str, days: int) -> KeyPair:
    """The broker's cert; every name or address a client may dial must be in `hosts`."""
    return _issue(
        ca,
        hosts[0],
        key_type,
        days,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [host_alt_name(h) for h in hosts],
    )


def issue_client_cert(ca: KeyPair, username: str, key_type: str, days: int) -> KeyPair:
    """A client cert whose CN is the MQTT username (`use_identity_as_username` reads the CN)."""
    return _issue(ca, username, key_type, days, ExtendedKeyUsageOID.CLIENT_AUTH, [])


def is_issued_by(cert: x509.Certificate, ca: KeyPair, min_days_left: int) -> bool:
    """True when `cert` was signed by this CA and stays valid for `min_days_left` more days."""
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return cert.not_valid_after_utc - utc_now() > datetime.timedelta(days=min_days_left)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, SECRET_FILE_MODE)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, PUBLIC_FILE_MODE)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def save_pair(pair: KeyPair, key_path: Path, cert_path: Path) -> None:
    write_private(key_path, key_pem(pair.key))
    write_public(cert_path, cert_pem(pair.cert))


def load_pair(key_path: Path, cert_path: Path) -> Optional[KeyPair]:
    """The pair stored at these paths, or None when neither exists."""
    if not key_path.exists() and not cert_path.exists():
        return None
    if not (key_path.exists() and cert_path.exists()):
        raise UserError(
            f"found only one of {key_path} and {cert_path}: restore the other or rerun with --force"
        )
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise UserError(f"{key_path} must hold an EC or RSA private key")
    return KeyPair(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))


def revocation(cert: x509.Certificate) -> x509.RevokedCertificate:
    return (
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(utc_now())
        .build()
    )


def load_revoked(path: Path, ca: KeyPair) -> List[x509.RevokedCertificate]:
    """Entries of the CA's current CRL; empty when absent or signed by another CA."""
    if not path.exists():
        return []
    crl = x509.load_pem_x509_crl(path.read_bytes())
    if not crl.is_signature_valid(ca.key.public_key()):  # type: ignore[arg-type]
        return []
    return list(crl)


def write_crl(path: Path, ca: KeyPair, revoked: List[x509.RevokedCertificate]) -> None:
    """Valid until the CA expires: OpenSSL refuses every client once a CRL's next update passes."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(utc_now())
        .next_update(ca.cert.not_valid_after_utc)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    write_public(path, crl.public_bytes(serialization.Encoding.PEM))
