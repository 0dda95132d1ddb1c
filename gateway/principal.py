"""Who one request is for: a plain value made by authentication (gateway/auth.py) and read everywhere after."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest

from accounts.models import ApiKey


@dataclass(frozen=True)
class Principal:
    """The caller of one request: a key (acting for its owner, if it has one) or a user with a JWT."""

    user_id: int | None
    api_key: ApiKey | None = None

    def allows_model(self, model: str) -> bool:
        """A key's model limit, which holds on every endpoint that names or lists models."""
        return self.api_key is None or self.api_key.allows_model(model)

    def allows_mcp_server(self, name: str) -> bool:
        """A key's MCP server limit (a user with a JWT may use every server open to the API)."""
        return self.api_key is None or self.api_key.allows_mcp_server(name)

    def default_mcp_servers(self) -> list[str]:
        """The servers a request uses when it names none: the key's defaults, if it was given any."""
        return list(self.api_key.default_mcp_servers or ()) if self.api_key is not None else []


class AuthedRequest(HttpRequest):
    """The request an API endpoint receives once its `auth` passed: django-ninja sets `auth` to the Principal.

    For the type checker only (endpoints are annotated with it); nothing makes one.
    """

    auth: Principal
