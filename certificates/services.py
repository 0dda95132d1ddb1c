"""The gateway certificate's life: saved from the page (checked first), removed, read back for serving and pages.

A save replaces the one row and is audited on the Configuration page's change list; once committed, this
process applies it at once (certificates/serving.py swaps what new TLS connections get) and
gateway/invalidation.py tells the other gateway processes to read it again. A refused upload raises
before anything is written, so the certificate in force stays as it was.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from django.conf import settings
from django.db import transaction

from operations.models import SettingChange
from optimagpt.secrets import encrypt

from .bundle import Bundle, Summary
from .models import GatewayCertificate
from .store import stored_fingerprint

log = logging.getLogger("optimagpt.certificates")

AUDIT_NAME = "Gateway certificate"


def _apply_here(bundle: Bundle | None) -> None:
    from .serving import side  # Twisted is imported only by a process that serves

    side.apply_threadsafe(bundle, source="stored")


def certificate_save(*, bundle: Bundle, source: str, username: str) -> GatewayCertificate:
    """Make `bundle` the gateway's certificate (already checked by certificates/bundle.py)."""
    if settings.OPTIMAGPT_TLS_CERT_FILE:
        raise ValueError("This gateway serves the certificate in OPTIMAGPT_TLS_CERT_FILE; replace that file instead.")
    summary = bundle.summary()
    with transaction.atomic():
        old = stored_fingerprint()
        row, _ = GatewayCertificate.objects.update_or_create(pk=GatewayCertificate.ONLY, defaults={
            "chain_pem": bundle.chain_pem(), "key_encrypted": encrypt(bundle.key_pem()),
            "fingerprint": summary.fingerprint, "subject": summary.subject[:500], "issuer": summary.issuer[:500],
            "names": list(summary.names), "not_before": summary.not_before, "not_after": summary.not_after,
            "source": source, "applied_by": username})
        SettingChange.objects.create(username=username, name=AUDIT_NAME, old=old or "none (HTTP only)",
                                     new=f"{summary.fingerprint} ({source}, {summary.subject})")
        transaction.on_commit(lambda: _apply_here(bundle))
    log.info("gateway certificate applied by %s: %s, SHA-256 %s", username, summary.subject, summary.fingerprint)
    return row


def certificate_remove(*, username: str) -> bool:
    """Go back to HTTP only. False when there was no certificate."""
    with transaction.atomic():
        old = stored_fingerprint()
        if old is None:
            return False
        GatewayCertificate.objects.filter(pk=GatewayCertificate.ONLY).delete()
        SettingChange.objects.create(username=username, name=AUDIT_NAME, old=old, new="none (HTTP only)")
        transaction.on_commit(lambda: _apply_here(None))
    log.info("gateway certificate removed by %s: HTTP only", username)
    return True


def _summary_of_row(row: GatewayCertificate) -> Summary:
    return Summary(subject=row.subject, issuer=row.issuer, names=tuple(row.names), not_before=row.not_before,
                   not_after=row.not_after, fingerprint=row.fingerprint, self_signed=row.subject == row.issuer)


def certificate_in_force() -> tuple[Summary | None, str]:
    """What this gateway serves (sync): the certificate's summary and where it comes from ("files", "stored")."""
    from .serving import side

    if settings.OPTIMAGPT_TLS_CERT_FILE:
        return side.files_summary(), "files"
    row = GatewayCertificate.objects.filter(pk=GatewayCertificate.ONLY).first()
    return (_summary_of_row(row), "stored") if row is not None else (None, "")


def chain_in_force(source: str) -> tuple[x509.Certificate, ...]:
    """The certificates (public) of what is in force, from `source` as certificate_in_force named it."""
    try:
        if source == "files":
            return tuple(x509.load_pem_x509_certificates(Path(settings.OPTIMAGPT_TLS_CERT_FILE).read_bytes()))
        if source == "stored":
            row = GatewayCertificate.objects.filter(pk=GatewayCertificate.ONLY).first()
            return tuple(x509.load_pem_x509_certificates(row.chain_pem.encode())) if row is not None else ()
    except (OSError, ValueError) as exc:
        log.warning("the certificate in force cannot be read: %s", type(exc).__name__)
    return ()


def expiry_warning(now: datetime | None = None) -> str:
    """The sentence the Nodes page and /readyz show from EXPIRY_WARNING_DAYS before the end; empty otherwise."""
    summary, _ = certificate_in_force()
    return summary.expiry_warning(now or datetime.now(UTC)) if summary is not None else ""
