"""The Certificates page (Certificate Management): what HTTPS serves, uploads, a self-signed one, the redirect."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from operations import config

from .bundle import (
    EXPIRY_WARNING_DAYS,
    MAX_UPLOAD_BYTES,
    Bundle,
    CertificateRefused,
    bundle_from_pem,
    bundle_from_pfx,
    bundle_self_signed,
    trust_check,
)
from .models import GatewayCertificate
from .services import certificate_in_force, certificate_remove, certificate_save, chain_in_force
from .serving import side

PERMISSION = "accounts.manage_certificates"
APPLIED = ("Applied: HTTPS serves it to new connections now, on every gateway process; connections already open "
           "keep theirs. Nothing was restarted.")


def _read(request: HttpRequest, field: str) -> bytes:
    upload = request.FILES.get(field)
    if upload is None:
        raise CertificateRefused("Choose a file to upload.")
    if upload.size is not None and upload.size > MAX_UPLOAD_BYTES:
        raise CertificateRefused(f"The file is larger than {MAX_UPLOAD_BYTES // 1024} KiB; it is not a certificate.")
    return upload.read(MAX_UPLOAD_BYTES + 1)


def _bundle_from_request(request: HttpRequest, action: str) -> tuple[Bundle, str]:
    if action == "pfx":
        return bundle_from_pfx(_read(request, "pfx"), request.POST.get("pfx_password", "")), "PFX upload"
    if action == "pem":
        return bundle_from_pem(_read(request, "cert"), _read(request, "key"),
                               request.POST.get("key_password", "")), "PEM upload"
    try:
        days = int(request.POST.get("days", "") or 365)
    except ValueError:
        raise CertificateRefused("The validity must be a whole number of days.") from None
    return bundle_self_signed(request.POST.get("names", ""), days), "self-signed"


@login_required
@permission_required(PERMISSION, raise_exception=True)
def certificates_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return render(request, "certificates/certificates.html", _context())
    username = request.user.get_username()
    action = request.POST.get("action", "")
    if action == "redirect":
        on = request.POST.get("redirect") == "on"
        config.https_redirect_switch(username=username, on=on)
        messages.success(request, "Browsers that open a page over HTTP are now sent to HTTPS." if on else
                         "Browsers are no longer sent from HTTP to HTTPS.")
        return redirect("certificates")
    if action == "remove":
        if certificate_remove(username=username):
            messages.success(request, "The certificate is removed: the gateway serves HTTP only. "
                                      "Nothing was restarted.")
        return redirect("certificates")
    if action not in ("pfx", "pem", "generate"):
        messages.error(request, "Unknown action.")
        return redirect("certificates")
    try:
        bundle, source = _bundle_from_request(request, action)
        certificate_save(bundle=bundle, source=source, username=username)
    except (CertificateRefused, ValueError) as exc:
        # Nothing was written: the certificate in force stays. The message never repeats what was uploaded.
        return render(request, "certificates/certificates.html", {**_context(), "refused": str(exc),
                                                                   "refused_form": action}, status=400)
    messages.success(request, APPLIED)
    return redirect("certificates")


def _context() -> dict[str, Any]:
    summary, source = certificate_in_force()
    chain = chain_in_force(source)
    trusted, why = trust_check(chain) if chain else (False, "")
    return {"section": "certificates", "summary": summary, "source": source, "trusted": trusted, "trust_reason": why,
            "warning": summary.expiry_warning() if summary else "", "warning_days": EXPIRY_WARNING_DAYS,
            "https": side.listening, "state": side.state, "https_port": settings.OPTIMAGPT_HTTPS_PORT,
            "files": settings.OPTIMAGPT_TLS_CERT_FILE, "check_s": settings.OPTIMAGPT_TLS_CHECK_S,
            "redirect_on": config.https_redirect_on(),
            "row": GatewayCertificate.objects.filter(pk=GatewayCertificate.ONLY).first()}


@require_GET
@login_required
@permission_required(PERMISSION, raise_exception=True)
def certificate_download_view(request: HttpRequest) -> HttpResponse:
    """The certificate and its intermediates (public): what nodes get as `--ca-file` for a self-signed one."""
    row = GatewayCertificate.objects.filter(pk=GatewayCertificate.ONLY).first()
    if row is None:
        return HttpResponse("There is no stored certificate.\n", status=404, content_type="text/plain")
    response = HttpResponse(row.chain_pem, content_type="application/x-pem-file")
    response["Content-Disposition"] = 'attachment; filename="optimagpt-gateway.pem"'
    return response

