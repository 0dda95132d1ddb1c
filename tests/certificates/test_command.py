"""`manage.py certificate`: shows, applies and removes; refusals change nothing; passwords never as arguments."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from certificates.models import GatewayCertificate
from operations.models import SettingChange

from .pki import ca_make, cert_pem, key_pem, leaf_make, pfx_of

pytestmark = pytest.mark.django_db(transaction=True)


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command("certificate", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_it_applies_a_pfx_whose_password_comes_from_the_environment(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = leaf_make(ca_make(), names=("gw.example.org",))
    pfx = tmp_path / "gw.pfx"
    pfx.write_bytes(pfx_of(cert, key, "cmd-pfx-pass"))
    monkeypatch.setenv("OPTIMAGPT_PFX_PASSWORD", "wrong")
    with pytest.raises(CommandError, match="Refused, nothing changed: .*password is wrong"):
        _run("--pfx", str(pfx))
    assert not GatewayCertificate.objects.exists()
    monkeypatch.setenv("OPTIMAGPT_PFX_PASSWORD", "cmd-pfx-pass")
    out = _run("--pfx", str(pfx))
    assert "Applied: CN=gw.example.org" in out and "cmd-pfx-pass" not in out
    shown = _run()
    assert "Names:     gw.example.org" in shown and "Trusted:   no" in shown and "days left" in shown
    assert SettingChange.objects.get(name="Gateway certificate").username == "manage.py certificate"


def test_it_applies_a_pem_pair_and_a_self_signed_one_and_removes(tmp_path: Path) -> None:
    cert, key = leaf_make(ca_make())
    (tmp_path / "c.pem").write_bytes(cert_pem(cert))
    (tmp_path / "k.pem").write_bytes(key_pem(key))
    assert "Applied" in _run("--pem", str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert GatewayCertificate.objects.get().source == "PEM upload"
    with pytest.raises(CommandError, match="does not belong"):
        (tmp_path / "other.pem").write_bytes(key_pem(leaf_make(ca_make())[1]))
        _run("--pem", str(tmp_path / "c.pem"), str(tmp_path / "other.pem"))
    with pytest.raises(CommandError, match="No such file"):
        _run("--pem", str(tmp_path / "missing.pem"), str(tmp_path / "k.pem"))
    assert "Applied" in _run("--self-signed", "gw.lan, 10.9.8.7", "--days", "30")
    assert GatewayCertificate.objects.get().names == ["gw.lan", "10.9.8.7"]
    assert "(public)" in _run("--export", str(tmp_path / "gateway.pem"))
    exported = (tmp_path / "gateway.pem").read_text()
    assert exported == GatewayCertificate.objects.get().chain_pem and "PRIVATE" not in exported
    assert _run("--remove") == "Removed: HTTP only.\n"
    assert _run() == "HTTP only: no certificate.\n"
    with pytest.raises(CommandError, match="no certificate to export"):
        _run("--export", str(tmp_path / "none.pem"))


def test_a_certificate_file_without_its_key_is_a_system_check_error(settings: object) -> None:
    from django.core import checks

    settings.OPTIMAGPT_TLS_CERT_FILE, settings.OPTIMAGPT_TLS_KEY_FILE = "/etc/ssl/gw.crt", ""
    errors = [m for m in checks.run_checks() if m.id == "optimagpt.E002"]
    assert len(errors) == 1 and "without OPTIMAGPT_TLS_KEY_FILE" in errors[0].msg
    settings.OPTIMAGPT_TLS_KEY_FILE = "/etc/ssl/gw.key"
    assert not [m for m in checks.run_checks() if m.id == "optimagpt.E002"]
