"""Certificate settings that cannot work, reported as Django system checks (manage.py, migrate, install-service)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.security)
def check_tls_files(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    cert, key = settings.OPTIMAGPT_TLS_CERT_FILE, settings.OPTIMAGPT_TLS_KEY_FILE
    if bool(cert) != bool(key):
        return [checks.Error(
            f"{'OPTIMAGPT_TLS_CERT_FILE' if cert else 'OPTIMAGPT_TLS_KEY_FILE'} is set without "
            f"{'OPTIMAGPT_TLS_KEY_FILE' if cert else 'OPTIMAGPT_TLS_CERT_FILE'}, so HTTPS cannot start.",
            hint="Give both files (--tls-cert and --tls-key), or neither and apply a certificate on the "
                 "Certificates page.",
            id="optimagpt.E002",
        )]
    return []
