"""A gateway certificate with its key: read from an upload (PFX/PKCS#12 or PEM), made self-signed, checked.

Plain functions over `cryptography`, no Django: the pages, the server's start-up and the file watcher
use them alike. Every refusal is a `CertificateRefused` whose message says what is wrong in words an
admin can act on; nothing here ever puts key material or a password into a message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

# The Nodes page, the certificate page and /readyz warn from this many days before the certificate expires.
EXPIRY_WARNING_DAYS = 30
MAX_UPLOAD_BYTES = 256 * 1024
SELF_SIGNED_DAYS_MAX = 3650

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


class CertificateRefused(ValueError):
    """An upload or a generation request that cannot become the gateway's certificate, and why."""


@dataclass(frozen=True)
class Bundle:
    """A leaf certificate, the intermediates that came with it, and its private key."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    def chain_pem(self) -> str:
        """The leaf and its intermediates as PEM: public, what a node may be given as its `--ca-file`."""
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (self.leaf, *self.chain))

    def key_pem(self) -> str:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()

    def summary(self) -> Summary:
        return summary_of(self.leaf)


@dataclass(frozen=True)
class Summary:
    """What the pages and /readyz say about a certificate: nothing in it is secret."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    fingerprint: str
    self_signed: bool

    def days_left(self, now: datetime | None = None) -> int:
        return int((self.not_after - (now or datetime.now(UTC))).total_seconds() // 86400)

    def expiry_warning(self, now: datetime | None = None) -> str:
        """Empty while more than EXPIRY_WARNING_DAYS are left; otherwise a sentence for the pages and /readyz."""
        now = now or datetime.now(UTC)
        if self.not_after <= now:
            return f"The gateway's certificate expired on {self.not_after:%Y-%m-%d}; clients refuse it."
        days = self.days_left(now)
        if days < EXPIRY_WARNING_DAYS:
            return (f"The gateway's certificate expires in {days} day{'' if days == 1 else 's'} "
                    f"({self.not_after:%Y-%m-%d}); upload its successor.")
        return ""


def fingerprint_of(cert: x509.Certificate) -> str:
    """SHA-256 as colon-separated hex, as browsers and `openssl x509 -fingerprint -sha256` show it."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))


def summary_of(cert: x509.Certificate) -> Summary:
    return Summary(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(), names=_names(cert),
                   not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                   fingerprint=fingerprint_of(cert), self_signed=cert.issuer == cert.subject)


def _checked(leaf: x509.Certificate, chain: list[x509.Certificate], key: object,
             now: datetime | None = None) -> Bundle:
    """The bundle, if `key` is the leaf's key and the leaf is valid now; else CertificateRefused with the reason."""
    if not isinstance(key, PrivateKey):
        raise CertificateRefused(f"The key is of a kind TLS servers do not use ({type(key).__name__}).")
    public = leaf.public_key()
    if public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertificateRefused("The private key does not belong to this certificate (their public keys differ).")
    now = now or datetime.now(UTC)
    if leaf.not_valid_after_utc <= now:
        raise CertificateRefused(f"The certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC.")
    if leaf.not_valid_before_utc > now:
        raise CertificateRefused(f"The certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC.")
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca and chain:
            raise CertificateRefused("The first certificate is a CA's; upload the server's own certificate first.")
    except x509.ExtensionNotFound:
        pass
    # Intermediates in the order a client needs them: those that are not the leaf, as given.
    rest = [c for c in chain if c != leaf]
    return Bundle(leaf=leaf, chain=tuple(rest), key=key)


def _size_checked(data: bytes, what: str) -> bytes:
    if not data:
        raise CertificateRefused(f"The {what} is empty.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise CertificateRefused(f"The {what} is larger than {MAX_UPLOAD_BYTES // 1024} KiB; it is not a certificate.")
    return data


def bundle_from_pfx(data: bytes, password: str) -> Bundle:
    """A PFX/PKCS#12 file (.pfx, .p12) and its password, as Windows and most CAs export them."""
    _size_checked(data, "PFX file")
    try:
        loaded = pkcs12.load_pkcs12(data, password.encode() if password else None)
    except ValueError as exc:
        # cryptography says "Invalid password or PKCS12 data" for both; tell them apart where we can.
        if password:
            try:
                pkcs12.load_pkcs12(data, None)
            except ValueError:
                pass
            else:
                raise CertificateRefused("This PFX file has no password; leave the password empty.") from None
        raise CertificateRefused("The PFX file could not be opened: the password is wrong, or it is not a "
                                 "PFX/PKCS#12 file.") from exc
    if loaded.cert is None:
        raise CertificateRefused("The PFX file holds no certificate for its key.")
    if loaded.key is None:
        raise CertificateRefused("The PFX file holds no private key; export it with its key.")
    return _checked(loaded.cert.certificate, [c.certificate for c in loaded.additional_certs], loaded.key)


def bundle_from_pem(cert_pem: bytes, key_pem: bytes, key_password: str | None = None) -> Bundle:
    """A PEM certificate (the server's first, then its intermediates, as CAs send them) and its PEM key."""
    _size_checked(cert_pem, "certificate")
    _size_checked(key_pem, "private key")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(cert_pem)]
        except ValueError:
            raise CertificateRefused("The certificate file is not a certificate (PEM or DER).") from None
    try:
        key = serialization.load_pem_private_key(key_pem, key_password.encode() if key_password else None)
    except TypeError:
        raise CertificateRefused("The private key is encrypted: give its password." if not key_password else
                                 "The private key is not encrypted: leave its password empty.") from None
    except ValueError:
        raise CertificateRefused("The private key file is not a PEM private key, or its password is wrong.") from None
    return _checked(certs[0], certs[1:], key)


def bundle_from_files(cert_path: Path, key_path: Path) -> Bundle:
    """The files a deployment manages itself (`--tls-cert`, `--tls-key`)."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise CertificateRefused(f"{exc.filename}: {exc.strerror}") from None
    return bundle_from_pem(cert_pem, key_pem)


def _host_name(label: str) -> bool:
    """A DNS name of letters, digits and hyphens, or a wildcard `*.` before one (no bare `*`)."""
    parts = label.removeprefix("*.").split(".")
    return len(label) <= 253 and all(0 < len(p) <= 63 and p.replace("-", "").isalnum() and p.isascii()
                                     for p in parts)


def parse_names(text: str) -> list[x509.GeneralName]:
    """Host names and IP addresses, separated by commas or spaces, as subject alternative names."""
    names: list[x509.GeneralName] = []
    for raw in text.replace(",", " ").split():
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(raw.strip("[]"))))
            continue
        except ValueError:
            pass
        label = raw.lower().rstrip(".")
        if not _host_name(label):
            raise CertificateRefused(f"{raw!r} is not a host name or an IP address.")
        names.append(x509.DNSName(label))
    if not names:
        raise CertificateRefused("Give at least one name: the host name clients use, e.g. gateway.example.org.")
    return names


def bundle_self_signed(names_text: str, days: int = 365, now: datetime | None = None) -> Bundle:
    """A self-signed certificate (EC P-256) for the names given: nodes trust it given it as their --ca-file."""
    if not 1 <= days <= SELF_SIGNED_DAYS_MAX:
        raise CertificateRefused(f"The validity must be from 1 to {SELF_SIGNED_DAYS_MAX} days.")
    names = parse_names(names_text)
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    first = names[0].value
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first)[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OptimaGPT gateway (self-signed)")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            # A CA of its own name only: clients given this certificate as their CA file accept it.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Bundle(leaf=cert, chain=(), key=key)


def bundle_load(chain_pem: str, key_pem: str) -> Bundle:
    """A stored bundle read back (already checked when it was saved; its expiry is the pages' business now)."""
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert isinstance(key, PrivateKey)
    return Bundle(leaf=certs[0], chain=tuple(certs[1:]), key=key)


def _system_store() -> tuple[Store | None, str]:
    """The CA certificates this system trusts (SSL_CERT_FILE / SSL_CERT_DIR as OpenSSL reads them)."""
    paths = ssl.get_default_verify_paths()
    certs: list[x509.Certificate] = []
    files = [Path(paths.cafile)] if paths.cafile else []
    if paths.capath and Path(paths.capath).is_dir():
        files += sorted(p for p in Path(paths.capath).iterdir() if p.suffix in (".pem", ".crt") and p.is_file())
    with warnings.catch_warnings():
        # Some CAs' old roots have serial numbers RFC 5280 forbids; cryptography reads them with a warning.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for path in files:
            try:
                certs += x509.load_pem_x509_certificates(path.read_bytes())
            except (OSError, ValueError):
                continue  # one unreadable file does not make the others untrusted
    if not certs:
        return None, "this system has no CA certificates to check against (install ca-certificates)"
    return Store(certs), ""


def trust_check(bundle_or_chain: Bundle | tuple[x509.Certificate, ...],
                now: datetime | None = None) -> tuple[bool, str]:
    """Whether clients that trust this system's CA store accept the certificate for its first name; and why not."""
    certs = ((bundle_or_chain.leaf, *bundle_or_chain.chain) if isinstance(bundle_or_chain, Bundle)
             else bundle_or_chain)
    leaf, intermediates = certs[0], list(certs[1:])
    names = _names(leaf)
    if not names:
        return False, "it names no host (no subject alternative name): browsers and clients refuse it"
    store, problem = _system_store()
    if store is None:
        return False, problem
    first = names[0]
    try:
        subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(first))
    except ValueError:
        # A wildcard covers any one label: check it for a host under it.
        subject = x509.DNSName("gateway." + first[2:] if first.startswith("*.") else first)
    verifier = PolicyBuilder().store(store).time(now or datetime.now(UTC)).build_server_verifier(subject)
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        if leaf.issuer == leaf.subject:
            return False, "it is self-signed: only clients given it as their CA trust it"
        return False, f"it does not chain to a CA this system trusts ({exc})"
    return True, "issued by a CA this system trusts"
