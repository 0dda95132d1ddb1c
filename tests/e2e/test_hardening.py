"""The attack pass's defects, reproduced against the real stack (daphne, node agent, llama.cpp), each fixed.

Each test sends what the attack sent and checks that the model stays up for everyone else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import MODEL_ID, NO_END, REPO

pytestmark = pytest.mark.e2e

PASSWORD = "a-long-throttle-password"


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}


def _one_token(gateway, api_key: str, timeout_s: float = 15) -> httpx.Response:
    """A 1-token chat: answered within seconds only while the model is free for everyone."""
    return httpx.post(gateway.url + "/v1/chat/completions", headers=_headers(api_key), timeout=timeout_s, json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})


# -- 1. the worker pipe ------------------------------------------------------------
def test_a_body_cannot_smuggle_a_request_onto_the_workers_pipe(gateway, node, api_key) -> None:
    smuggled = json.dumps({"op": "completion", "id": "INJ", "stream": False,
                           "body": {"prompt": "Once upon a time", "max_tokens": 100000}})
    body = ('{"model": "' + MODEL_ID + '", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '
            '"pad": [\n' + smuggled + '\n]}')
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=_headers(api_key), content=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    pretty = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                        indent=2)
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=_headers(api_key), content=pretty, timeout=30)
    assert response.status_code == 200, "pretty-printed JSON gets an answer"
    assert _one_token(gateway, api_key, 10).status_code == 200, "no smuggled generation holds the model"


# -- 2. one request cannot fail the model --------------------------------------------
def test_a_token_outside_the_vocabulary_is_400_and_the_model_stays_up(gateway, node, api_key) -> None:
    for _ in range(4):  # the attack crashed the worker three times in a row, and the executor gave up
        response = httpx.post(gateway.url + "/v1/embeddings", headers=_headers(api_key), timeout=30,
                              json={"model": MODEL_ID, "input": [1000000000]})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert _one_token(gateway, api_key).status_code == 200
    assert "crash" not in node.log().lower()


# -- 3. messages over 1 MiB on the link ----------------------------------------------
def test_messages_over_a_mebibyte_cross_the_link_and_another_stream_goes_on(gateway, node, api_key) -> None:
    streamed: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=_headers(api_key), timeout=60, json={
                "model": MODEL_ID, "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 60,
                "stream": True}) as response:
            streamed.extend(line for line in response.iter_lines() if line)

    other = threading.Thread(target=stream)
    other.start()
    big = httpx.post(gateway.url + "/v1/chat/completions", headers=_headers(api_key), timeout=60, json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "blob": "x" * 1_100_000})
    assert big.status_code == 200, big.text
    many = httpx.post(gateway.url + "/v1/embeddings", headers=_headers(api_key), timeout=120, json={
        "model": MODEL_ID, "input": [f"input number {i}" for i in range(150)]})
    assert many.status_code == 200, many.text
    assert len(many.content) > 1024 * 1024 and len(many.json()["data"]) == 150
    other.join(60)
    assert streamed and streamed[-1] == "data: [DONE]", streamed[-3:]
    assert not any("error" in line for line in streamed)
    assert _one_token(gateway, api_key).status_code == 200


# -- 4. max_tokens and cancel, whatever text the tokens make ---------------------------
def test_max_tokens_and_a_disconnect_hold_for_tokens_that_make_no_character(gateway, node, api_key) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"187": 100}}
    started = time.monotonic()
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=_headers(api_key), timeout=30, json={
            **body, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[-1][6:])["usage"]["completion_tokens"] == 5
    finished = json.loads(lines[-2][6:])["choices"][0]["finish_reason"]
    assert finished == "length"
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=_headers(api_key), timeout=30,
                          json={**body, "max_tokens": 5})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
    assert time.monotonic() - started < 20
    # Long ones whose bytes make no character (each streams U+FFFD, as invalid UTF-8 decodes), as many as the
    # process decodes at once: their clients give up after the first chunk, and the model must stop with them,
    # or the next request waits behind 3000 tokens of each.
    def abandon() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=_headers(api_key), timeout=30,
                          json={**body, "max_tokens": 3000, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    return

    abandoned = [threading.Thread(target=abandon) for _ in range(8)]
    for thread in abandoned:
        thread.start()
    for thread in abandoned:
        thread.join(60)
    assert _one_token(gateway, api_key, 10).status_code == 200, "the abandoned generations stopped"


# -- 5, 6. logins: throttled per address, on every way in, and never the account -------------
def _from(address: str, gateway) -> httpx.Client:
    """A client whose connections come from `address` (any 127.x reaches the gateway on 127.0.0.1)."""
    return httpx.Client(base_url=gateway.url, transport=httpx.HTTPTransport(local_address=address), timeout=30)


def _make_user(gateway, username: str, kind: str) -> None:
    subprocess.run([sys.executable, "manage.py", "create_user", username, "--type", kind], cwd=REPO,
                   env=gateway.env, input=PASSWORD + "\n", text=True, check=True, capture_output=True)


def _admin_login(client: httpx.Client, username: str, password: str) -> httpx.Response:
    client.get("/admin/login/")
    return client.post("/admin/login/?next=/admin/", data={
        "username": username, "password": password, "csrfmiddlewaretoken": client.cookies["csrftoken"],
        "next": "/admin/"})


def test_admin_login_is_throttled_like_every_other_login(gateway, node) -> None:
    _make_user(gateway, "throttled-staff", "admin")
    with _from("127.0.0.21", gateway) as attacker:
        for _ in range(30):
            assert _admin_login(attacker, "throttled-staff", "wrong-password").status_code == 200
        right = _admin_login(attacker, "throttled-staff", PASSWORD)
        assert right.status_code == 200 and "sessionid" not in attacker.cookies, "the 31st, correct, is refused"
        # The same throttle on the other ways in.
        api = attacker.post("/api/auth/login", json={"username": "throttled-staff", "password": PASSWORD})
        assert api.status_code == 429 and api.headers["Retry-After"]
    with _from("127.0.0.22", gateway) as owner:
        assert _admin_login(owner, "throttled-staff", PASSWORD).status_code == 302, "the owner elsewhere gets in"


def test_failed_logins_slow_the_attackers_address_not_the_victims_account(gateway, node) -> None:
    _make_user(gateway, "victim", "user")
    with _from("127.0.0.31", gateway) as attacker:
        for _ in range(6):
            attacker.get("/login/")
            attacker.post("/login/", data={"username": "victim", "password": "guess",
                                           "csrfmiddlewaretoken": attacker.cookies["csrftoken"]},
                          headers={"X-Forwarded-For": f"198.51.100.{_}"})  # not a trusted proxy: ignored
        attacker.get("/login/")
        throttled = attacker.post("/login/", data={"username": "victim", "password": PASSWORD,
                                                   "csrfmiddlewaretoken": attacker.cookies["csrftoken"]})
        assert throttled.status_code == 429 and "Too many failed logins" in throttled.text
    with _from("127.0.0.32", gateway) as victim:
        api = victim.post("/api/auth/login", json={"username": "victim", "password": PASSWORD})
        assert api.status_code == 200, api.text
        victim.get("/login/")
        page = victim.post("/login/", data={"username": "victim", "password": PASSWORD,
                                            "csrfmiddlewaretoken": victim.cookies["csrftoken"]})
        assert page.status_code == 302


# -- 8. what a key may do --------------------------------------------------------------
def test_a_key_does_inference_only_unless_granted_and_its_model_limit_holds_everywhere(gateway, node) -> None:
    _make_user(gateway, "scoped-boss", "admin")
    limited = gateway.manage("create_api_key", "--name", "limited", "--user", "scoped-boss",
                             "--models", "some-other-model").strip()
    manager = gateway.manage("create_api_key", "--name", "manager", "--user", "scoped-boss",
                             "--scopes", "management").strip()
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        executors = http.get("/optima/v1/executors", headers=_headers(manager)).json()["data"]
        (smol,) = [e for e in executors if e["model_id"] == MODEL_ID]
        for method, path in (("POST", f"/optima/v1/executors/{smol['id']}/stop"), ("GET", "/optima/v1/executors"),
                             ("POST", "/optima/v1/executors"), ("GET", "/optima/v1/conversations"),
                             ("POST", "/optima/v1/conversations")):
            response = http.request(method, path, headers=_headers(limited), json={})
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "missing_scope"
        assert http.get("/v1/models", headers=_headers(limited)).json()["data"] == []
        assert http.get(f"/v1/models/{MODEL_ID}", headers=_headers(limited)).status_code == 404
        assert http.get("/optima/v1/models", headers=_headers(limited)).json()["chat_models"] == []
        # The management scope does not lift the model limit, nor inference come with it.
        narrow = gateway.manage("create_api_key", "--name", "narrow-manager", "--user", "scoped-boss",
                                "--scopes", "management", "--models", "some-other-model").strip()
        assert http.get("/optima/v1/executors", headers=_headers(narrow)).json()["data"] == []
        assert http.post(f"/optima/v1/executors/{smol['id']}/stop", headers=_headers(narrow)).status_code == 404
        assert http.get("/v1/models", headers=_headers(manager)).status_code == 403
    assert _one_token(gateway, gateway.create_api_key("after-scopes")).status_code == 200, "the model still runs"


# -- 10. data files ---------------------------------------------------------------------
def test_the_database_and_its_folder_are_readable_by_their_owner_only(gateway, node) -> None:
    assert gateway.data_dir.stat().st_mode & 0o777 == 0o700
    files = list(gateway.data_dir.glob("optimagpt.sqlite3*"))
    assert files
    for path in files:
        assert path.stat().st_mode & 0o077 == 0, f"{path.name} is {oct(path.stat().st_mode & 0o777)}"


# -- 12. the smaller ones -----------------------------------------------------------------
def test_bad_bodies_are_400s_in_openai_form_and_never_reach_the_model(gateway, node, api_key) -> None:
    _make_user(gateway, "deep-boss", "admin")
    manager = gateway.manage("create_api_key", "--name", "deep-manager", "--user", "deep-boss",
                             "--scopes", "management").strip()
    deep = "[" * 100_000 + "]" * 100_000
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    nested: dict = {"type": "object"}
    for _ in range(200):
        nested = {"type": "object", "properties": {"a": nested}}
    cases = [
        ("/optima/v1/executors", manager, deep),
        ("/v1/chat/completions", api_key, deep),
        ("/v1/chat/completions", api_key, json.dumps({**chat, "top_k": [1]})),
        ("/v1/chat/completions", api_key, json.dumps({**chat, "messages": [
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"x": 1}}]},
            {"role": "user", "content": "Hi"}]})),
        ("/v1/chat/completions", api_key, json.dumps({**chat, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": nested}}]})),
        ("/v1/chat/completions", api_key,
         json.dumps({**chat, "messages": [{"role": "user", "content": "x"}] * 25_000})),
    ]
    for path, key, body in cases:
        started = time.monotonic()
        response = httpx.post(gateway.url + path, headers=_headers(key), content=body, timeout=30)
        assert response.status_code == 400, (path, body[:80], response.text[:300])
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in response.text and "Error:" not in response.json()["error"]["message"]
        assert time.monotonic() - started < 5, (path, body[:80])
    assert _one_token(gateway, api_key).status_code == 200


def test_messages_that_cannot_fit_the_window_are_refused_before_the_template_renders_them(
        gateway, node, api_key) -> None:
    started = time.monotonic()
    response = httpx.post(gateway.url + "/v1/chat/completions", headers=_headers(api_key), timeout=30, json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "x"}] * 4000, "max_tokens": 1})
    assert response.status_code == 400 and "context window" in response.json()["error"]["message"]
    assert time.monotonic() - started < 3


def _resubmit_without(html: str, dropped: str) -> dict[str, list[str]]:
    """The values a browser would post back from the first form of `html`, with checkbox `dropped` unticked."""
    from html.parser import HTMLParser

    values: dict[str, list[str]] = {}

    class Form(HTMLParser):
        select: str | None = None

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            name = a.get("name")
            if tag == "input" and name and name != dropped:
                if a.get("type") in ("checkbox", "radio") and "checked" not in a:
                    return
                if a.get("type") not in ("submit", "button", "file"):
                    values.setdefault(name, []).append(a.get("value") or ("on" if a.get("type") == "checkbox" else ""))
            elif tag == "select":
                self.select = name
            elif tag == "option" and self.select and "selected" in a:
                values.setdefault(self.select, []).append(a.get("value") or "")

        def handle_endtag(self, tag: str) -> None:
            if tag == "select":
                self.select = None

    Form().feed(html)
    return values


def test_deactivating_a_user_ends_their_keys_requests_at_once(gateway, node) -> None:
    _make_user(gateway, "leaver", "user")
    gateway.manage("shell", "--no-imports", "-c",
                   "from accounts.models import User; from django.contrib.auth.models import Permission; "
                   "User.objects.get(username='leaver').user_permissions.add("
                   "Permission.objects.get(codename='access_gateway'))")
    key = gateway.manage("create_api_key", "--name", "leavers-key", "--user", "leaver").strip()
    user_id = gateway.manage("shell", "--no-imports", "-c",
                             "from accounts.models import User; print(User.objects.get(username='leaver').pk)").strip()
    admin = gateway.admin_browser("deactivating-admin", PASSWORD)
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=_headers(key), timeout=120, json={
                "model": MODEL_ID, "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": 2000, "logit_bias": NO_END, "stream": True}) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)

    streaming = threading.Thread(target=stream)
    streaming.start()
    deadline = time.monotonic() + 30
    while len(lines) < 3:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.05)
    page = admin.get(f"/admin/accounts/user/{user_id}/change/")
    form = _resubmit_without(page.text, "is_active")
    form["csrfmiddlewaretoken"] = [admin.cookies["csrftoken"]]
    saved = admin.post(f"/admin/accounts/user/{user_id}/change/", data=form)
    assert saved.status_code == 302, saved.text[-2000:]
    ended_at = time.monotonic()
    streaming.join(30)
    assert not streaming.is_alive()
    assert time.monotonic() - ended_at < 2, "the stream ended at once"
    assert "api_key_revoked" in lines[-1], lines[-1]
    assert _one_token(gateway, key, 10).status_code == 403

