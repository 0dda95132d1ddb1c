"""The stored certificate read back (sync): for serving (certificates/serving.py) and the pages alike."""

from __future__ import annotations

import logging

from optimagpt.secrets import SecretUnreadable, decrypt

from .bundle import Bundle, bundle_load
from .models import GatewayCertificate

log = logging.getLogger("optimagpt.certificates")


def stored_fingerprint() -> str | None:
    return GatewayCertificate.objects.filter(pk=GatewayCertificate.ONLY).values_list("fingerprint", flat=True).first()


def stored_bundle() -> Bundle | None:
    """The stored certificate with its key, or None; None too when the key can no longer be read."""
    row = GatewayCertificate.objects.filter(pk=GatewayCertificate.ONLY).first()
    if row is None:
        return None
    try:
        return bundle_load(row.chain_pem, decrypt(row.key_encrypted))
    except SecretUnreadable:
        log.error("the stored certificate's key cannot be decrypted (SECRET_KEY changed?): serving HTTP only")
        return None
