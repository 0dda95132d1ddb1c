"""MCP servers in Django admin: the page's checks hold there too, and the token is write-only."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.models import User
from mcp_servers.models import McpServer

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "admin-form-token-never-shown"


def _form(**fields: str) -> dict[str, str]:
    return {"name": "calc", "transport": "http", "url": "http://127.0.0.1:9/mcp", "command": "", "token": "",
            "chat_enabled": "on", "api_enabled": "on", **fields}


def test_the_admin_refuses_what_the_page_refuses(admin: User) -> None:
    client = Client()
    client.force_login(admin)
    for fields, message in [({"url": "http://169.254.169.254/"}, "link-local"),
                            ({"name": "has_underscore"}, "letters, digits and hyphens"),
                            ({"transport": "stdio", "url": "", "command": "bash"}, "OPTIMAGPT_MCP_STDIO_COMMANDS")]:
        response = client.post("/admin/mcp_servers/mcpserver/add/", _form(**fields))
        assert response.status_code == 200 and message in response.content.decode(), fields
    assert not McpServer.objects.exists()


def test_the_token_is_stored_encrypted_and_never_shown(admin: User) -> None:
    client = Client()
    client.force_login(admin)
    response = client.post("/admin/mcp_servers/mcpserver/add/", _form(token=TOKEN))
    assert response.status_code == 302
    server = McpServer.objects.get()
    assert server.token() == TOKEN and TOKEN not in server.token_encrypted
    assert server.status == McpServer.Status.CONNECTING
    page = client.get(f"/admin/mcp_servers/mcpserver/{server.pk}/change/").content.decode()
    assert "calc" in page and TOKEN not in page
    client.post(f"/admin/mcp_servers/mcpserver/{server.pk}/change/", _form())  # token left empty: kept
    assert McpServer.objects.get().token() == TOKEN
