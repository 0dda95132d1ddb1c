"""Without SECRET_KEY and with DEBUG off, nothing starts, and the reason comes with a hint."""

import subprocess
import sys

from tests.processes import REPO, base_env, free_port


def _env() -> dict[str, str]:
    env = base_env()
    env.pop("SECRET_KEY")
    env.pop("DEBUG", None)
    return env


def test_manage_commands_stop_with_a_system_check_error_and_a_hint(tmp_path) -> None:
    env = {**_env(), "OPTIMAGPT_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "optimagpt.E001" in result.stderr and "HINT" in result.stderr and "SECRET_KEY" in result.stderr


def test_the_gateway_refuses_to_serve(tmp_path) -> None:
    env = {**_env(), "OPTIMAGPT_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "optimagpt.server", "-b", "127.0.0.1", "-p", str(free_port())],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr + result.stdout
