"""The gateway's certificate: one row, the one HTTPS serves; its private key encrypted at rest."""

from __future__ import annotations

from django.db import models


class GatewayCertificate(models.Model):
    """The certificate every gateway process serves on OPTIMAGPT_HTTPS_PORT (none: HTTP only).

    Only one row exists (pk 1): a new upload replaces it in one statement, so a process that reads it
    sees the old certificate or the new one, never half of each. The key is Fernet-encrypted
    (optimagpt/secrets.py) and is never shown, downloaded or logged.
    """

    ONLY = 1

    chain_pem = models.TextField(help_text="the certificate and its intermediates, PEM (public)")
    key_encrypted = models.TextField(help_text="the private key, PEM, Fernet-encrypted with a key from SECRET_KEY")
    fingerprint = models.CharField(max_length=95, help_text="SHA-256 of the certificate")
    subject = models.CharField(max_length=500)
    issuer = models.CharField(max_length=500)
    names = models.JSONField(default=list)
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    source = models.CharField(max_length=40, help_text="how it came: a PFX upload, a PEM upload, self-signed")
    applied_by = models.CharField(max_length=150, blank=True)
    applied_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(pk=1), name="gatewaycertificate_only_one")]

    def __str__(self) -> str:
        return f"{self.subject} ({self.fingerprint[:11]}…)"
