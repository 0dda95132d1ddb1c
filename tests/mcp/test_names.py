"""The names MCP tools are offered under: valid OpenAI function names, unique across servers and tools."""

from __future__ import annotations

import pytest

from mcp_servers.names import FUNCTION_NAME, offered_names, server_name_problem


@pytest.mark.parametrize("name", ["calc", "Time-2", "a", "x" * 32])
def test_good_server_names_pass(name: str) -> None:
    assert server_name_problem(name) == ""


@pytest.mark.parametrize("name", ["", "my_server", "has space", "-lead", "trail-", "x" * 33, "dot.ted", "ünï"])
def test_server_names_that_cannot_make_function_names_are_refused(name: str) -> None:
    assert "letters, digits and hyphens" in server_name_problem(name)


def test_tools_are_offered_as_server_underscore_tool() -> None:
    assert offered_names("calc", ["add", "get_time"]) == {"calc_add": "add", "calc_get_time": "get_time"}


def test_two_servers_with_the_same_tool_make_different_names() -> None:
    a, b = offered_names("a", ["b_c"]), offered_names("a-b", ["c"])
    assert set(a).isdisjoint(b)


def test_odd_and_long_tool_names_become_valid_unique_names() -> None:
    tools = ["files/read", "files.read", "files-read", "x" * 200, "x" * 201, "ok"]
    offered = offered_names("server-with-a-long-name-of-32-ch", tools)
    assert sorted(offered.values()) == sorted(tools)  # every tool is offered once
    assert all(FUNCTION_NAME.match(name) for name in offered), offered
    assert len(set(offered)) == len(tools)
