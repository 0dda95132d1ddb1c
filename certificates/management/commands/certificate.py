"""`manage.py certificate`: what HTTPS serves, or a new certificate for it, from a shell (as on the Certificates page).

A PFX's password and a PEM key's password are read from OPTIMAGPT_PFX_PASSWORD / OPTIMAGPT_KEY_PASSWORD or from
standard input, never from an argument (arguments show in `ps` and in shell history).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from certificates.bundle import (
    Bundle,
    CertificateRefused,
    bundle_from_pem,
    bundle_from_pfx,
    bundle_self_signed,
    trust_check,
)
from certificates.services import certificate_in_force, certificate_remove, certificate_save, chain_in_force

WHO = "manage.py certificate"


def _password(variable: str, what: str) -> str:
    if variable in os.environ:
        return os.environ[variable]
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"{what} (empty if none): ")
    return sys.stdin.readline().rstrip("\n")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror}") from None


class Command(BaseCommand):
    help = ("Show the gateway's certificate, or apply one: --pfx FILE, --pem CERT KEY, --self-signed NAMES; "
            "--remove goes back to HTTP only. Running gateways serve the change within OPTIMAGPT_TLS_CHECK_S.")

    def add_arguments(self, parser: CommandParser) -> None:
        how = parser.add_mutually_exclusive_group()
        how.add_argument("--pfx", metavar="FILE", help="a PFX/PKCS#12 file; its password from OPTIMAGPT_PFX_PASSWORD "
                                                      "or standard input")
        how.add_argument("--pem", nargs=2, metavar=("CERT", "KEY"), help="PEM certificate (with intermediates) "
                                                                        "and key; a key password from "
                                                                        "OPTIMAGPT_KEY_PASSWORD or standard input")
        how.add_argument("--self-signed", metavar="NAMES", help='host names and addresses, e.g. "gw.lan, 10.0.0.5"')
        how.add_argument("--remove", action="store_true", help="remove the certificate: HTTP only")
        how.add_argument("--export", metavar="FILE", help="write the certificate in force and its intermediates "
                                                         "(public, PEM) to FILE: a node's --ca-file")
        parser.add_argument("--days", type=int, default=365, help="validity of a self-signed certificate")

    def handle(self, *args: Any, pfx: str | None, pem: list[str] | None, self_signed: str | None, remove: bool,
               export: str | None, days: int, **options: Any) -> None:
        if export is not None:
            self._export(Path(export))
            return
        if remove:
            self.stdout.write("Removed: HTTP only." if certificate_remove(username=WHO) else "There was none.")
            return
        if pfx is None and pem is None and self_signed is None:
            self._show()
            return
        try:
            bundle, source = self._bundle(pfx, pem, self_signed, days)
            certificate_save(bundle=bundle, source=source, username=WHO)
        except (CertificateRefused, ValueError) as exc:
            raise CommandError(f"Refused, nothing changed: {exc}") from None
        summary = bundle.summary()
        self.stdout.write(f"Applied: {summary.subject}, SHA-256 {summary.fingerprint}; running gateways serve it "
                          f"on port {settings.OPTIMAGPT_HTTPS_PORT} within {settings.OPTIMAGPT_TLS_CHECK_S:g} s.")

    def _bundle(self, pfx: str | None, pem: list[str] | None, self_signed: str | None, days: int) -> tuple[Bundle, str]:
        if pfx is not None:
            data = _read(pfx)
            return bundle_from_pfx(data, _password("OPTIMAGPT_PFX_PASSWORD", "PFX password")), "PFX upload"
        if pem is not None:
            cert, key = _read(pem[0]), _read(pem[1])
            # An encrypted key says so in its PEM header (PKCS#8 and the older OpenSSL form alike).
            password = _password("OPTIMAGPT_KEY_PASSWORD", "Key password") if b"ENCRYPTED" in key else None
            return bundle_from_pem(cert, key, password or None), "PEM upload"
        assert self_signed is not None
        return bundle_self_signed(self_signed, days), "self-signed"

    def _export(self, path: Path) -> None:
        summary, source = certificate_in_force()
        chain = chain_in_force(source)
        if summary is None or not chain:
            raise CommandError("There is no certificate to export: HTTP only.")
        path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain))
        self.stdout.write(f"Wrote {path}: {summary.subject}, SHA-256 {summary.fingerprint} (public).")

    def _show(self) -> None:
        summary, source = certificate_in_force()
        if summary is None:
            self.stdout.write("HTTP only: no certificate.")
            return
        trusted, why = trust_check(chain) if (chain := chain_in_force(source)) else (False, "unreadable")
        self.stdout.write(f"Subject:   {summary.subject}\nNames:     {', '.join(summary.names) or 'none'}\n"
                          f"Issuer:    {summary.issuer}\nValid:     {summary.not_before:%Y-%m-%d} to "
                          f"{summary.not_after:%Y-%m-%d} ({summary.days_left()} days left)\n"
                          f"SHA-256:   {summary.fingerprint}\nFrom:      {'files' if source == 'files' else 'stored'}\n"
                          f"Trusted:   {'yes' if trusted else 'no'}: {why}")
        if warning := summary.expiry_warning():
            self.stderr.write(warning)
