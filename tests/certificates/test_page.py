"""The Certificates page in process: Certificate Management needed; uploads applied, stored encrypted and audited;
refusals change nothing; the key never shown; the warning before expiry on the page, the Nodes page and /readyz."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from accounts.models import User
from certificates.models import GatewayCertificate
from operations import config
from operations.models import SettingChange

from .pki import ca_make, cert_pem, key_pem, leaf_make, pfx_of

pytestmark = pytest.mark.django_db(transaction=True)
PAGE = "/manage/certificates/"


def _as(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _pfx(client: Client, data: bytes, password: str) -> object:
    return client.post(PAGE, {"action": "pfx", "pfx_password": password,
                              "pfx": SimpleUploadedFile("gateway.pfx", data, "application/x-pkcs12")})


def _stored() -> GatewayCertificate | None:
    return GatewayCertificate.objects.first()


@pytest.mark.parametrize("page", [PAGE, PAGE + "certificate.pem"])
def test_the_page_needs_certificate_management(page: str, admin: User, member: User, outsider: User) -> None:
    assert _as(admin).get(page).status_code in (200, 404)  # no certificate to download yet: 404
    assert _as(member).get(page).status_code == 403
    assert _as(outsider).get(page).status_code == 403
    assert _as(None).get(page)["Location"].startswith("/login/")
    assert _as(outsider).post(PAGE, {"action": "generate", "names": "localhost"}).status_code == 403
    assert _stored() is None


def test_a_granted_certificate_management_opens_the_page_and_the_menu_link(outsider: User) -> None:
    from django.contrib.auth.models import Permission

    outsider.user_permissions.add(Permission.objects.get(codename="manage_certificates"))
    page = _as(User.objects.get(pk=outsider.pk)).get(PAGE)
    assert page.status_code == 200 and b'href="/manage/certificates/"' in page.content
    assert b"HTTP only" in page.content and b"No certificate" in page.content


def test_an_uploaded_pfx_is_stored_with_its_key_encrypted_audited_and_never_shown(admin: User) -> None:
    ca = ca_make()
    cert, key = leaf_make(ca, names=("gateway.example.org", "localhost"))
    client = _as(admin)
    response = _pfx(client, pfx_of(cert, key, "pfx-pass-4411", chain=(ca[0],)), "pfx-pass-4411")
    assert response.status_code == 302
    row = _stored()
    assert row is not None and row.source == "PFX upload" and row.applied_by == "ada"
    assert row.names == ["gateway.example.org", "localhost"]
    secret = key_pem(key).decode()
    body = "".join(secret.splitlines()[1:-1])
    assert body not in row.key_encrypted and "PRIVATE KEY" not in row.key_encrypted
    page = client.get(PAGE).content.decode()
    assert "Certificate not trusted" in page and "does not chain to a CA" in page
    assert "gateway.example.org" in page and row.fingerprint in page
    assert body[:40] not in page and "pfx-pass-4411" not in page
    download = client.get(PAGE + "certificate.pem")
    assert download.status_code == 200 and download.content == cert_pem(cert, ca[0])
    assert b"PRIVATE" not in download.content
    change = SettingChange.objects.get(name="Gateway certificate")
    assert change.old == "none (HTTP only)" and row.fingerprint in change.new
    assert "pfx-pass-4411" not in change.new and body[:40] not in change.new


@pytest.mark.parametrize("case", ["wrong password", "mismatched key", "expired", "not a certificate"])
def test_a_broken_upload_is_refused_with_its_reason_and_changes_nothing(case: str, admin: User) -> None:
    ca = ca_make()
    client = _as(admin)
    good_cert, good_key = leaf_make(ca)
    assert _pfx(client, pfx_of(good_cert, good_key, "pw"), "pw").status_code == 302
    before = _stored()
    assert before is not None
    if case == "wrong password":
        response = _pfx(client, pfx_of(*leaf_make(ca), "right-one"), "wrong-one-77")
        reason = "password is wrong"
    elif case == "mismatched key":
        cert, _ = leaf_make(ca)
        response = client.post(PAGE, {"action": "pem", "cert": SimpleUploadedFile("c.pem", cert_pem(cert)),
                                      "key": SimpleUploadedFile("k.pem", key_pem(leaf_make(ca)[1]))})
        reason = "does not belong to this certificate"
    elif case == "expired":
        cert, key = leaf_make(ca, days=5, starts_days_ago=6)
        response = client.post(PAGE, {"action": "pem", "cert": SimpleUploadedFile("c.pem", cert_pem(cert)),
                                      "key": SimpleUploadedFile("k.pem", key_pem(key))})
        reason = "expired on"
    else:
        response = client.post(PAGE, {"action": "pem", "cert": SimpleUploadedFile("c.pem", b"just text"),
                                      "key": SimpleUploadedFile("k.pem", key_pem(good_key))})
        reason = "not a certificate"
    assert response.status_code == 400
    page = response.content.decode()
    assert "Refused, nothing changed" in page and reason in page
    assert "wrong-one-77" not in page
    after = _stored()
    assert after is not None and (after.fingerprint, after.key_encrypted) == (before.fingerprint, before.key_encrypted)
    assert SettingChange.objects.filter(name="Gateway certificate").count() == 1


def test_a_self_signed_certificate_is_made_for_the_names_given_and_can_be_removed(admin: User) -> None:
    client = _as(admin)
    assert client.post(PAGE, {"action": "generate", "names": "gw.lan, 10.1.2.3", "days": "90"}).status_code == 302
    row = _stored()
    assert row is not None and row.source == "self-signed" and row.names == ["gw.lan", "10.1.2.3"]
    page = client.get(PAGE).content.decode()
    assert "self-signed" in page and "only clients given it as their CA trust it" in page
    refused = client.post(PAGE, {"action": "generate", "names": "not a_name", "days": "90"})
    assert refused.status_code == 400 and "is not a host name" in refused.content.decode()
    assert client.post(PAGE, {"action": "generate", "names": "x.lan", "days": "many"}).status_code == 400
    assert _stored().fingerprint == row.fingerprint
    assert client.post(PAGE, {"action": "remove"}).status_code == 302
    assert _stored() is None and "HTTP only" in client.get(PAGE).content.decode()


def test_the_redirect_switch_is_stored_and_audited(admin: User) -> None:
    client = _as(admin)
    assert not config.https_redirect_on()
    assert client.post(PAGE, {"action": "redirect", "redirect": "on"}).status_code == 302
    assert config.https_redirect_on()
    assert SettingChange.objects.get(name="HTTPS redirect for browsers").new == "on"
    assert client.post(PAGE, {"action": "redirect"}).status_code == 302
    assert not config.https_redirect_on()


def test_an_expiring_certificate_is_warned_of_on_the_page_the_nodes_page_and_readyz(admin: User) -> None:
    ca = ca_make()
    client = _as(admin)
    cert, key = leaf_make(ca, days=13, starts_days_ago=1)
    assert _pfx(client, pfx_of(cert, key, "pw"), "pw").status_code == 302
    days = (cert.not_valid_after_utc - datetime.now(UTC)) // timedelta(days=1)
    sentence = f"expires in {days} days"
    assert sentence in client.get(PAGE).content.decode()
    nodes = client.get("/manage/nodes/").content.decode()
    assert sentence in nodes and 'id="certificate-warning"' in nodes
    ready = client.get("/readyz").json()
    assert ready["https"]["days_left"] == days and sentence in ready["https"]["warning"]
    assert ready["https"]["serving"] is False  # no listener in a test process
    # Far from its end: no warning anywhere.
    cert, key = leaf_make(ca, days=200)
    assert _pfx(client, pfx_of(cert, key, "pw"), "pw").status_code == 302
    assert "expires in" not in client.get("/manage/nodes/").content.decode()
    assert "warning" not in client.get("/readyz").json()["https"]
