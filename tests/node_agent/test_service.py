"""The systemd units and their one-time setup: `systemd-analyze verify` (nothing on stderr) and `systemd-analyze
security --offline=yes` (MEDIUM at worst) on the units as written, from Debian's systemd package; the setup
into a scratch folder, its files' modes, and no secret in the unit, the environment file or the output."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent.service import Unit, gateway_unit, node_unit

REPO = Path(__file__).resolve().parents[2]
RATINGS = ("OK", "MEDIUM", "EXPOSED", "UNSAFE")


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is not installed, and CI must run this test (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def _check(unit_path: Path) -> str:
    """Verify the unit and rate its hardening; the rating."""
    analyze = _systemd_analyze()
    verified = subprocess.run([analyze, "verify", unit_path.name], cwd=unit_path.parent, capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    rated = subprocess.run([analyze, "security", "--offline=yes", unit_path.name], cwd=unit_path.parent,
                           capture_output=True, text=True, timeout=60)
    assert rated.returncode == 0, rated.stderr
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", rated.stdout)
    assert level is not None, rated.stdout
    return level.group(2)


@pytest.mark.parametrize("make", [gateway_unit, node_unit])
def test_each_unit_verifies_cleanly_and_is_hardened(make, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "service.env").write_text("")
    unit: Unit = make(python=Path(sys.executable), app=REPO, user="optimagpt", state=tmp_path / "state",
                      env_file=tmp_path / "service.env")
    path = tmp_path / unit.name
    path.write_text(unit.text)
    assert RATINGS.index(_check(path)) <= RATINGS.index("MEDIUM")
    assert "ExecStart=" + sys.executable + " -m " in unit.text  # the installed program, nothing else on start
    assert "pip" not in unit.text and "bootstrap" not in unit.text and "Restart=on-failure" in unit.text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_node_setup_writes_a_unit_and_keeps_the_key_out_of_it(tmp_path: Path) -> None:
    key = "node-key-for-the-service-test-0123456789"
    (tmp_path / "key").write_text(key + "\n")
    (tmp_path / "models").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "node_agent", "install-service", "--no-system-user", "--state-dir",
         str(tmp_path / "state"), "--env-file", str(tmp_path / "etc/node.env"), "--unit-dir", str(tmp_path / "units"),
         "--gateway-url", "https://gateway.example.org", "--models-dir", str(tmp_path / "models"), "--name", "box",
         "--access-key-file", str(tmp_path / "key")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "systemctl enable --now optimanode.service" in result.stdout
    unit, env = tmp_path / "units/optimanode.service", tmp_path / "etc/node.env"
    state = tmp_path / "state"
    assert (state / "node_access_key").read_text().strip() == key
    assert _mode(state) == 0o700 and _mode(state / "node_access_key") == 0o600 and _mode(env) == 0o640
    assert "OPTIMAGPT_GATEWAY_URL=https://gateway.example.org" in env.read_text()
    for text in (unit.read_text(), env.read_text(), result.stdout, result.stderr):
        assert key not in text
    assert RATINGS.index(_check(unit)) <= RATINGS.index("MEDIUM")


def test_the_gateway_setup_migrates_makes_the_admin_and_writes_its_unit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE",
                                                            "SECRET_KEY", "OPTIMAGPT_NODE_ACCESS_KEY")}
    result = subprocess.run(
        [sys.executable, "-m", "node_agent.service", "gateway", "--no-system-user", "--state-dir",
         str(tmp_path / "state"), "--env-file", str(tmp_path / "etc/gateway.env"), "--unit-dir",
         str(tmp_path / "units"), "--port", "8123"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    state = tmp_path / "state"
    assert (state / "optimagpt.sqlite3").exists() and "Admin login:   admin / " in result.stdout
    secret, node_key = (state / "secret_key").read_text().strip(), (state / "node_access_key").read_text().strip()
    assert _mode(state / "secret_key") == 0o600 and _mode(state / "node_access_key") == 0o600
    unit, env_file = (tmp_path / "units/optimagpt-gateway.service").read_text(), (tmp_path / "etc/gateway.env")
    assert "-m optimagpt.server -b 0.0.0.0 -p 8123" in unit and f"ReadWritePaths={state}" in unit
    assert "OPTIMAGPT_HTTPS_PORT=8443" in env_file.read_text()  # where HTTPS comes up once a certificate is applied
    for text in (unit, env_file.read_text(), result.stdout, result.stderr):
        assert secret not in text and node_key not in text
    # A second run keeps every key and the admin: setting up again changes no secret.
    again = subprocess.run(result.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (state / "secret_key").read_text().strip() == secret and "shown once" not in again.stdout
    # Commands against the installed service: its settings and database, as its user (here: whoever runs this).
    service_env = {**env, "OPTIMAGPT_SERVICE_ENV": str(env_file), "OPTIMAGPT_SERVICE_USER": getpass.getuser(),
                   "OPTIMAGPT_VENV": sys.prefix}
    managed = subprocess.run(["./optimagpt.sh", "service-manage", "certificate", "--self-signed", "gw.example.org"],
                             cwd=REPO, env=service_env, capture_output=True, text=True, timeout=120)
    assert managed.returncode == 0 and "Applied: " in managed.stdout and "CN=gw.example.org" in managed.stdout
    shown = subprocess.run(["./optimagpt.sh", "service-manage", "certificate"], cwd=REPO, env=service_env,
                           capture_output=True, text=True, timeout=120)
    assert "Names:     gw.example.org" in shown.stdout, shown.stderr
    assert RATINGS.index(_check(tmp_path / "units/optimagpt-gateway.service")) <= RATINGS.index("MEDIUM")


def test_the_node_setup_enrolls_with_a_token_as_the_service_and_keeps_the_gateways_ca(tmp_path: Path) -> None:
    """Against a real gateway: the token enrolls the node (its credential in the state folder, 0600), the node needs
    no shared key, the gateway's certificate is copied in and named in the environment file; no token anywhere."""
    from certificates.bundle import bundle_self_signed
    from tests.processes import Gateway, free_port

    (tmp_path / "gw").mkdir()
    gateway = Gateway(data_dir=tmp_path / "gw", port=free_port())
    gateway.start()
    try:
        token = gateway.manage("create_enrollment_token", "--ttl", "600").strip()
        (tmp_path / "token").write_text(token + "\n")
        (tmp_path / "ca.pem").write_text(bundle_self_signed("localhost").chain_pem())
        (tmp_path / "not-a-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
        (tmp_path / "models").mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("OPTIMAGPT_NODE_ACCESS_KEY",
                                                                "OPTIMAGPT_ENROLLMENT_TOKEN")}
        argv = [sys.executable, "-m", "node_agent", "install-service", "--no-system-user", "--state-dir",
                str(tmp_path / "state"), "--env-file", str(tmp_path / "etc/node.env"), "--unit-dir",
                str(tmp_path / "units"), "--gateway-url", gateway.url, "--models-dir", str(tmp_path / "models"),
                "--name", "enrolled-box", "--ca-file", str(tmp_path / "ca.pem")]
        refused = subprocess.run([*argv[:-1], str(tmp_path / "not-a-ca.pem"), "--enrollment-token-file",
                                  str(tmp_path / "token")], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "not a readable PEM certificate" in refused.stderr
        result = subprocess.run([*argv, "--enrollment-token-file", str(tmp_path / "token")], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "Enrolled enrolled-box" in result.stdout
        state, env_file = tmp_path / "state", (tmp_path / "etc/node.env").read_text()
        assert _mode(state / "node_secret") == 0o600 and (state / "enrolled").exists()
        assert not (state / "node_access_key").exists() and "ACCESS_KEY" not in env_file
        assert f"OPTIMAGPT_GATEWAY_CA_FILE={state / 'gateway-ca.pem'}" in env_file
        assert (state / "gateway-ca.pem").read_text() == (tmp_path / "ca.pem").read_text()
        assert gateway.nodes_query("Node.objects.get(name='enrolled-box').approved") == "True"
        credential = (state / "node_secret").read_text().strip()
        for text in (env_file, (tmp_path / "units/optimanode.service").read_text(), result.stdout, result.stderr):
            assert token not in text and credential not in text
        # The single-use token is spent: a second machine with it is refused, with the gateway's reason.
        again = subprocess.run([*argv[:6], str(tmp_path / "state2"), *argv[7:], "--enrollment-token-file",
                                str(tmp_path / "token")], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode != 0 and "could not enroll" in again.stderr and "used up" in again.stderr
        assert token not in again.stderr
    finally:
        gateway.stop()
