"""Enrollment tokens in process: what a token may be, its keyed hash, the enroll endpoint's errors in OpenAI's
form, the per-address throttle on refused tokens, and the Nodes page's permission."""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings
from django.test import AsyncClient, Client

from accounts.models import User
from nodes.enrollment import EnrollmentRefused, node_credential, node_enroll, token_create
from nodes.models import EnrollmentToken, Node

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_token_is_stored_as_a_keyed_hash_and_spent_use_by_use() -> None:
    token, raw = token_create(name="box", ttl_s=60, uses=2)
    stored = EnrollmentToken.objects.get(pk=token.pk)
    assert raw.startswith(stored.prefix) and raw not in (stored.digest, stored.prefix)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    credential = node_enroll(raw_token=raw, node_id=first, name="one", address="10.0.0.1")
    assert node_credential(first) == credential and len(credential) == 64
    assert raw not in Node.objects.get(node_id=first).identity_secret_encrypted
    node_enroll(raw_token=raw, node_id=second, name="two", address="10.0.0.2")
    with pytest.raises(EnrollmentRefused, match="used up"):
        node_enroll(raw_token=raw, node_id=str(uuid.uuid4()), name="three", address="10.0.0.3")
    with pytest.raises(EnrollmentRefused, match="registered already"):
        node_enroll(raw_token=token_create(ttl_s=60)[1], node_id=first, name="again", address="10.0.0.1")
    assert EnrollmentToken.objects.get(pk=token.pk).uses == 2
    Node.objects.filter(node_id=first).delete()
    assert node_credential(first) is None  # deleted: its credential is gone with it


@pytest.mark.parametrize(("ttl", "uses", "message"), [(0, 1, "between 1 second"), (31 * 86400, 1, "30 days"),
                                                      (60, 0, "at least one use")])
def test_a_token_out_of_range_is_refused(ttl: float, uses: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        token_create(ttl_s=ttl, uses=uses)


async def test_the_enroll_endpoint_answers_in_openais_form_and_throttles_guessing() -> None:
    client = AsyncClient()
    body = {"token": "oge-not-a-real-token", "node_id": str(uuid.uuid4()), "name": "x"}
    response = await client.post("/optima/v1/nodes/enroll", body, content_type="application/json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "enrollment_refused"
    assert "not known" in response.json()["error"]["message"]
    bad = await client.post("/optima/v1/nodes/enroll", {"token": "x"}, content_type="application/json")
    assert bad.status_code == 400 and "error" in bad.json()
    for _ in range(settings.OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE):
        await client.post("/optima/v1/nodes/enroll", body, content_type="application/json")
    throttled = await client.post("/optima/v1/nodes/enroll", body, content_type="application/json")
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) > 0


def test_making_and_revoking_tokens_needs_node_management(admin: User, outsider: User) -> None:
    outside = Client()
    outside.force_login(outsider)
    assert outside.post("/manage/nodes/enrollment/", {"ttl_hours": "1", "uses": "1"}).status_code == 403
    inside = Client()
    inside.force_login(admin)
    page = inside.post("/manage/nodes/enrollment/", {"name": "n", "ttl_hours": "1", "uses": ""})
    assert page.status_code == 200 and page.context["new_token"].startswith("oge-")
    token = EnrollmentToken.objects.get(name="n")
    assert token.uses_allowed is None
    assert outside.post(f"/manage/nodes/enrollment/{token.pk}/revoke/").status_code == 403
    assert inside.post(f"/manage/nodes/enrollment/{token.pk}/revoke/").status_code == 302
    assert EnrollmentToken.objects.get(pk=token.pk).revoked
    refused = inside.post("/manage/nodes/enrollment/", {"ttl_hours": "soon"}, follow=True)
    assert "The lifetime must be a number of hours" in refused.content.decode()
