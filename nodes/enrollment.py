"""Node enrollment: a short-lived token (optionally single-use) that a new node exchanges for a credential of its
own, as OllaBridge's enrollment tokens.

`python -m node_agent join --gateway-url URL --token T` sends the token with the node's id over HTTPS (or to
localhost) to `POST /optima/v1/nodes/enroll`; the gateway checks the token, counts the use, registers the node
(approved: an admin made the token) and answers with the node's credential, which the agent keeps in its state
folder (0600). From then on the node links with that credential in place of the shared access key, in the same
challenge and response (nothing secret on the wire). The credential is the node's identity secret: deleting or
deactivating the node revokes it at once; another node's id with it is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from node_agent.protocol import new_node_secret
from optimagpt.secrets import SecretUnreadable, decrypt, encrypt

from .models import EnrollmentToken, Node
from .signals import executors_changed

log = logging.getLogger("optimagpt.nodes.enrollment")

TOKEN_PREFIX = "oge-"  # nosec B105 # not a password: the prefix of an OptimaGPT enrollment token
VISIBLE_CHARS = len(TOKEN_PREFIX) + 6
MAX_TTL_S = 30 * 86400


class EnrollmentRefused(Exception):
    """The token cannot enroll this node (the reason is safe to tell the node)."""


def _digest(raw: str) -> str:
    secret = hashlib.sha256(b"optimagpt-enrollment-token\n" + settings.SECRET_KEY.encode()).digest()
    return hmac.new(secret, raw.encode(), hashlib.sha256).hexdigest()


def token_create(*, name: str = "", ttl_s: float = 3600, uses: int | None = 1, username: str = "") -> tuple[
        EnrollmentToken, str]:
    """A new token and its text, shown this once. ValueError for a lifetime or use count out of range."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"A token lives between 1 second and {MAX_TTL_S // 86400} days.")
    if uses is not None and uses < 1:
        raise ValueError("A token allows at least one use (or any number, left empty).")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = EnrollmentToken.objects.create(name=name[:100], prefix=raw[:VISIBLE_CHARS], digest=_digest(raw),
                                           created_by=username[:150], uses_allowed=uses,
                                           expires_at=timezone.now() + timedelta(seconds=ttl_s))
    return token, raw


def token_revoke(*, pk: int) -> None:
    EnrollmentToken.objects.filter(pk=pk).update(revoked=True)


def node_enroll(*, raw_token: str, node_id: str, name: str, address: str) -> str:
    """Spend one use of the token on registering `node_id`; the node's credential. Raises EnrollmentRefused."""
    try:
        uid = uuid.UUID(node_id)
    except ValueError:
        raise EnrollmentRefused("node_id is not a UUID") from None
    if not raw_token.startswith(TOKEN_PREFIX) or len(raw_token) > 200:
        raise EnrollmentRefused("this is not an enrollment token")
    digest = _digest(raw_token)
    credential = new_node_secret()
    with transaction.atomic():
        token = EnrollmentToken.objects.select_for_update().filter(digest=digest).first()
        if token is None or not hmac.compare_digest(token.digest, digest):
            raise EnrollmentRefused("this enrollment token is not known")
        if token.revoked:
            raise EnrollmentRefused("this enrollment token was revoked")
        if timezone.now() >= token.expires_at:
            raise EnrollmentRefused("this enrollment token has expired")
        if token.uses_allowed is not None and token.uses >= token.uses_allowed:
            raise EnrollmentRefused("this enrollment token has been used up")
        if Node.objects.filter(node_id=uid).exists():
            raise EnrollmentRefused("a node with this id is registered already: delete it on the Nodes page first")
        Node.objects.create(node_id=uid, name=name[:100] or str(uid)[:8], address=address[:255], approved=True,
                            enrolled=True, identity_secret_encrypted=encrypt(credential))
        token.uses += 1
        token.save(update_fields=["uses"])
    executors_changed.send(sender=Node)
    log.info("node %s (%s) enrolled from %s with the token %s", name[:100], uid, address, token.prefix)
    return credential


def node_credential(node_id: str) -> str | None:
    """The credential an enrolled node links with; None if there is none (never enrolled, deleted, or unreadable)."""
    try:
        uid = uuid.UUID(node_id)
    except ValueError:
        return None
    encrypted = Node.objects.filter(node_id=uid, enrolled=True).values_list("identity_secret_encrypted",
                                                                            flat=True).first()
    if not encrypted:
        return None
    try:
        return decrypt(encrypted)
    except SecretUnreadable:
        return None
