"""Reading, checking and making gateway certificates (certificates/bundle.py): each refusal says why."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certificates.bundle import (
    CertificateRefused,
    bundle_from_pem,
    bundle_from_pfx,
    bundle_load,
    bundle_self_signed,
    fingerprint_of,
    parse_names,
    trust_check,
)

from .pki import ca_make, cert_pem, key_pem, leaf_make, pfx_of


@pytest.fixture(scope="module")
def ca() -> tuple:
    return ca_make()


def test_a_pfx_with_its_password_gives_the_certificate_its_key_and_its_chain(ca: tuple) -> None:
    cert, key = leaf_make(ca, names=("gateway.example.org", "10.0.0.5"))
    bundle = bundle_from_pfx(pfx_of(cert, key, "s3cret pass", chain=(ca[0],)), "s3cret pass")
    assert bundle.leaf == cert and bundle.chain == (ca[0],)
    summary = bundle.summary()
    assert summary.names == ("gateway.example.org", "10.0.0.5")
    assert summary.fingerprint == fingerprint_of(cert) and len(summary.fingerprint) == 95
    assert summary.issuer == ca[0].subject.rfc4514_string() and not summary.self_signed
    # What is stored reads back to the same certificate and key.
    again = bundle_load(bundle.chain_pem(), bundle.key_pem())
    assert again.leaf == cert and again.key_pem() == bundle.key_pem()


def test_a_wrong_pfx_password_is_refused_without_repeating_it(ca: tuple) -> None:
    cert, key = leaf_make(ca)
    with pytest.raises(CertificateRefused, match="password is wrong") as refused:
        bundle_from_pfx(pfx_of(cert, key, "right-password"), "wrong-password-123")
    assert "wrong-password-123" not in str(refused.value) and "right-password" not in str(refused.value)


def test_a_password_given_for_a_pfx_without_one_is_told_apart(ca: tuple) -> None:
    cert, key = leaf_make(ca)
    with pytest.raises(CertificateRefused, match="has no password"):
        bundle_from_pfx(pfx_of(cert, key, ""), "something")
    assert bundle_from_pfx(pfx_of(cert, key, ""), "").leaf == cert


def test_a_key_that_is_not_the_certificates_is_refused(ca: tuple) -> None:
    cert, _ = leaf_make(ca)
    _, other_key = leaf_make(ca)
    with pytest.raises(CertificateRefused, match="does not belong to this certificate"):
        bundle_from_pem(cert_pem(cert), key_pem(other_key))


def test_an_expired_certificate_is_refused_with_its_end_date(ca: tuple) -> None:
    cert, key = leaf_make(ca, days=10, starts_days_ago=11)
    with pytest.raises(CertificateRefused, match=f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"):
        bundle_from_pem(cert_pem(cert), key_pem(key))
    with pytest.raises(CertificateRefused, match="expired"):
        bundle_from_pfx(pfx_of(cert, key, "pw"), "pw")


def test_a_certificate_not_yet_valid_is_refused(ca: tuple) -> None:
    cert, key = leaf_make(ca, days=10, starts_days_ago=-2)
    with pytest.raises(CertificateRefused, match="not valid before"):
        bundle_from_pem(cert_pem(cert), key_pem(key))


@pytest.mark.parametrize(("cert", "key", "reason"), [
    (b"", b"x", "is empty"),
    (b"hello, not a certificate", b"x", "not a certificate"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"x", "not a certificate"),
    (b"x" * (300 * 1024), b"x", "larger than"),
])
def test_what_is_not_a_certificate_is_refused(cert: bytes, key: bytes, reason: str) -> None:
    with pytest.raises(CertificateRefused, match=reason):
        bundle_from_pem(cert, key)


def test_a_pem_key_that_is_not_a_key_and_an_encrypted_key_without_password_are_refused(ca: tuple) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = leaf_make(ca)
    with pytest.raises(CertificateRefused, match="not a PEM private key"):
        bundle_from_pem(cert_pem(cert), b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"kpw"))
    with pytest.raises(CertificateRefused, match="encrypted: give its password"):
        bundle_from_pem(cert_pem(cert), encrypted)
    assert bundle_from_pem(cert_pem(cert), encrypted, "kpw").leaf == cert


def test_garbage_as_a_pfx_is_refused() -> None:
    with pytest.raises(CertificateRefused, match="not a PFX"):
        bundle_from_pfx(b"\x30\x82garbage" * 10, "pw")


def test_a_ca_certificate_first_with_others_after_it_is_refused(ca: tuple) -> None:
    cert, _ = leaf_make(ca)
    with pytest.raises(CertificateRefused, match="CA's"):
        bundle_from_pem(cert_pem(ca[0], cert), key_pem(ca[1]))


def test_a_self_signed_certificate_names_what_it_is_given(tmp_path: Path) -> None:
    bundle = bundle_self_signed("gateway.lan, 192.168.1.20 localhost [::1]", days=30)
    summary = bundle.summary()
    assert summary.names == ("gateway.lan", "localhost", "192.168.1.20", "::1")
    assert summary.self_signed and 29 <= summary.days_left() <= 30
    # A client given it as its CA file accepts it for its names: what a node's --ca-file does.
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(bundle.chain_pem())
    store = ssl.create_default_context(cafile=str(ca_file))
    assert store.get_ca_certs()[0]["subject"] == ((("commonName", "gateway.lan"),),
                                                  (("organizationName", "OptimaGPT gateway (self-signed)"),))


@pytest.mark.parametrize(("names", "reason"), [("", "at least one name"), ("bad_name!", "not a host name"),
                                               ("*", "not a host name"), ("a..b", "not a host name")])
def test_names_that_are_not_host_names_are_refused(names: str, reason: str) -> None:
    with pytest.raises(CertificateRefused, match=reason):
        parse_names(names)


def test_a_self_signed_validity_out_of_range_is_refused() -> None:
    with pytest.raises(CertificateRefused, match="from 1 to 3650 days"):
        bundle_self_signed("localhost", days=0)


def test_trust_is_checked_against_the_systems_ca_store(ca: tuple, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = leaf_make(ca, names=("gateway.example.org",))
    bundle = bundle_from_pem(cert_pem(cert), key_pem(key))
    # This machine's own store does not know the test CA.
    trusted, why = trust_check(bundle)
    assert not trusted and "does not chain to a CA this system trusts" in why
    # A system whose store holds it (SSL_CERT_FILE, as OpenSSL reads it) trusts it.
    store = tmp_path / "ca-bundle.pem"
    store.write_bytes(cert_pem(ca[0]))
    monkeypatch.setenv("SSL_CERT_FILE", str(store))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    assert trust_check(bundle) == (True, "issued by a CA this system trusts")
    # Self-signed: said so.
    trusted, why = trust_check(bundle_self_signed("localhost"))
    assert not trusted and "self-signed" in why
    # Past its end, a trusted chain is not trusted any more.
    trusted, _ = trust_check(bundle, now=datetime.now(UTC) + timedelta(days=400))
    assert not trusted


def test_a_certificate_that_names_no_host_is_not_trusted(ca: tuple) -> None:
    ca_cert, ca_key = ca
    cert, key = leaf_make(ca)
    bare = x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca_cert.subject) \
        .public_key(key.public_key()).serial_number(1).not_valid_before(cert.not_valid_before_utc) \
        .not_valid_after(cert.not_valid_after_utc).sign(ca_key, hashes.SHA256())
    trusted, why = trust_check(bundle_from_pem(cert_pem(bare), key_pem(key)))
    assert not trusted and "names no host" in why
