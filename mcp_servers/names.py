"""The names under which MCP tools are offered to models: `<server>_<tool>`, valid OpenAI function names.

OpenAI function names match `^[a-zA-Z0-9_-]{1,64}$`. A server name has no
underscore, so the first `_` of an offered name ends the server's part and two
servers never make the same name, whatever tools they expose. A tool name with
other characters (MCP allows dots and slashes) has them replaced by `-`; one too
long is cut; where that makes two tools of one server collide, each gets a short
hash of its real name.
"""

from __future__ import annotations

import hashlib
import re

FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SERVER_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?$")
SERVER_NAME_RULE = ("1 to 32 letters, digits and hyphens, starting and ending with a letter or digit (no "
                    "underscores or spaces: tools are offered to models as <name>_<tool>)")
MAX = 64


def server_name_problem(name: str) -> str:
    """Why `name` cannot be a server's name, or ""."""
    if not SERVER_NAME.match(name):
        return f"The name must be {SERVER_NAME_RULE}."
    return ""


def _hashed(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:6]


def offered_names(server: str, tools: list[str]) -> dict[str, str]:
    """Offered name -> the tool's own name, for every tool of `server` (whose name passed server_name_problem)."""
    room = MAX - len(server) - 1
    cleaned = {tool: re.sub(r"[^a-zA-Z0-9_-]", "-", tool)[:room] or "tool" for tool in tools}
    counts: dict[str, int] = {}
    for part in cleaned.values():
        counts[part] = counts.get(part, 0) + 1
    offered: dict[str, str] = {}
    for tool, part in cleaned.items():
        if counts[part] > 1:
            part = f"{part[: room - 7]}-{_hashed(tool)}"
        offered[f"{server}_{part}"] = tool
    return offered
