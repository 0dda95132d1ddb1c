"""docker-compose.yml, checked without a Docker engine (none runs on these machines): every command it runs, every
setting it passes and every healthcheck it names exists in the project. The same topology (PostgreSQL, Redis, two
gateways, a node) runs natively in tests/e2e/test_redis_postgres.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"postgres", "redis"}  # services of stock images: their settings are the images' own


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _ours() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in _compose()["services"].items() if name not in IMAGES}


def _sources() -> str:
    return "\n".join(p.read_text() for p in [REPO / "optimagpt/settings.py", REPO / "node_agent/settings.py",
                                            REPO / "node_agent/simulator.py", REPO / "node_agent/enroll.py",
                                            *REPO.glob("operations/*.py")])


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:  # the image's own: the Dockerfile's CMD
        cmd = re.search(r"^CMD (\[.*\])", (REPO / "Dockerfile").read_text(), re.M)
        assert cmd is not None
        return yaml.safe_load(cmd.group(1))
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_every_setting_the_compose_file_passes_is_one_the_programs_read() -> None:
    sources = _sources()
    for name, service in _ours().items():
        for variable in service.get("environment") or {}:
            assert re.search(rf"[\"']{variable}[\"']", sources), f"{name}: {variable} is read nowhere"


@pytest.mark.parametrize("name", sorted(_ours()))
def test_every_command_runs_a_program_of_the_project_with_arguments_it_takes(name: str) -> None:
    argv = _command(_ours()[name])
    assert argv[0] == "python"
    if argv[1] == "manage.py":
        commands = {p.stem for p in REPO.glob("*/management/commands/*.py")} | {"migrate", "createsuperuser"}
        assert argv[2] in commands, argv
    elif argv[1:3] == ["-m", "optimagpt.server"]:
        assert (REPO / "optimagpt/server.py").exists() and {"-b", "-p"} <= set(argv)  # daphne's own flags
    elif argv[1:4] == ["-m", "node_agent", "join"]:
        from node_agent.enroll import join_parser

        joining = join_parser().parse_args(argv[4:])
        assert joining.gateway_url.startswith("https://"), "join refuses plain http to another host"
    elif argv[1:3] == ["-m", "node_agent"]:
        from node_agent.settings import parse_settings

        # The agent's own parser takes these arguments (its key comes from the environment, as in the file).
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OPTIMAGPT_NODE_ACCESS_KEY", "a-key-for-parsing-only")
            settings = parse_settings(argv[3:])
        assert settings.gateway_url.startswith("http")
    else:
        pytest.fail(f"{name} runs {argv}, which is not a program of this project")


def test_gateways_are_checked_on_readyz_with_the_images_own_python() -> None:
    from django.urls import resolve

    services = _ours()
    for name in ("gateway-a", "gateway-b"):
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], test  # the slim image has no curl
        assert "/readyz" in test[3]
        assert resolve("/readyz").url_name == "readyz"
        compile(test[3], "healthcheck", "exec")  # it is Python
    assert services["node"]["depends_on"]["gateway-b"]["condition"] == "service_healthy"
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_both_gateways_serve_https_on_a_port_of_their_own_and_the_enrolled_node_links_over_it() -> None:
    """HTTPS through the certificate setting: the port each gateway serves it on is published, and the enrolled
    node's join and link both go to gateway B's HTTPS port trusting the certificate mounted for it."""
    services = _ours()
    published = {name: {p.rsplit(":", 2)[-1] for p in services[name]["ports"]} for name in ("gateway-a", "gateway-b")}
    for name, ports in published.items():
        https_port = services[name]["environment"]["OPTIMAGPT_HTTPS_PORT"]
        assert https_port in ports, f"{name} does not publish its HTTPS port"
    for name in ("node-join", "node-enrolled"):
        assert services[name]["profiles"] == ["enrolled"], "the shared-key node is the default"
        assert "https://gateway-b:8443" in _command(services[name])
        assert services[name]["environment"]["OPTIMAGPT_GATEWAY_CA_FILE"] == "/certs/gateway.pem"
    assert services["node-enrolled"]["depends_on"]["node-join"]["condition"] == "service_completed_successfully"
