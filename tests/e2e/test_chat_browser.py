"""OptimaChat in real headless Chromium against a running gateway and node with SmolLM2, one feature a test:
send with Enter and see the model title the chat, change the system prompt and see it counted in the context
visualiser, stop mid-reply, regenerate, switch model, rename, search, delete, phone width; Markdown, code and
thinking blocks render, and nothing a user or a model writes runs. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ARTIFACTS, MODEL_ID
from tests.processes import REPO

pytestmark = pytest.mark.e2e

PASSWORD = "a-long-chat-password-1"
TIMEOUT_MS = 30_000
REMOTE_MODEL = "smol-remote"
# A model whose reply is long whatever it is asked: a simulated node making 4000 tokens at 20 a second, so
# Stop always finds a reply still running (SmolLM2 asked to count to 1000 sometimes answered one sentence).
LONG_MODEL = "sim-long"
XSS = ('<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> '
       '<a href="javascript:window.__xss = 3">link</a> <svg onload="window.__xss = 4"></svg>')
# A reply as a model might write it, stored as it came: Markdown, code, a thinking block, and every kind of
# markup that must stay text.
REPLY = f"""<think>They want a greeting. <script>window.__xss = 5</script></think>
Here is **bold** text, a [safe link](https://example.com/docs) and a [bad link](javascript:window.__xss=6).

{XSS}

- one
- two

```python
def hello():
    return "world"  # greet
```
"""
CODE = 'def hello():\n    return "world"  # greet'


def _remote_upstream(gateway, api_key: str):
    """A second chat model: this same gateway registered as a remote upstream (hybrid mode) under another id."""
    subprocess.run([sys.executable, "manage.py", "create_user", "chatboss", "--type", "admin"], cwd=REPO,
                   env=gateway.env, input=PASSWORD + "\n", text=True, check=True, capture_output=True)
    admin_key = gateway.manage("create_api_key", "--name", "chatboss", "--user", "chatboss",
                              "--scopes", "management").strip()
    headers = {"Authorization": f"Bearer {admin_key}"}
    created = httpx.post(gateway.url + "/optima/v1/executors", headers=headers, timeout=60, json={
        "name": "SmolLM2 (remote)", "model_id": REMOTE_MODEL, "base_url": gateway.url + "/v1",
        "upstream_model": MODEL_ID, "api_key": api_key})
    assert created.status_code == 201, created.text
    return lambda: httpx.delete(f"{gateway.url}/optima/v1/executors/{created.json()['id']}", headers=headers,
                                timeout=60)


def _stored_reply(gateway, username: str) -> str:
    """A conversation of `username` holding REPLY as the model's answer, written to the database directly; its id."""
    return gateway.manage("shell", "--no-imports", "-c", (
        "from accounts.models import User; from chat.models import Conversation, Message\n"
        f"c = Conversation.objects.create(user=User.objects.get(username={username!r}), title='Stored reply', "
        f"model_id={MODEL_ID!r}, turn_count=1)\n"
        "Message.objects.create(conversation=c, role='user', content='Show me everything.')\n"
        f"Message.objects.create(conversation=c, role='assistant', content={json.dumps(REPLY)}, "
        f"model_id={MODEL_ID!r})\n"
        "print(c.pk)")).strip()


def _user(gateway, username: str) -> None:
    subprocess.run([sys.executable, "manage.py", "create_user", username, "--type", "user"], cwd=REPO,
                   env=gateway.env, input=PASSWORD + "\n", text=True, check=True, capture_output=True)


def _signed_in(browser, gateway, username: str, problems: list[str], width: int):
    """A browser context (clipboard allowed) and a page signed in as `username`, on the gateway's front page;
    refusals by the Content-Security-Policy and script errors are collected in `problems`."""
    context = browser.new_context(viewport={"width": width, "height": 900},
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.goto(gateway.url + "/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    return context, page


def _evidence(page, name: str) -> None:
    """What the page showed when a step failed: a screenshot, and its messages and notices on stdout."""
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    print("notice:", page.inner_text("#notice"), "| status:", page.inner_text("#run-status"))
    for item in page.locator("#messages > li").all():
        print(item.get_attribute("class"), repr(item.inner_text()[:300]))


def _tokens(model_path, text: str) -> int:
    from llama_cpp import Llama

    vocabulary = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    return len(vocabulary.tokenize(text.encode(), add_bos=False, special=False))


LAST_REPLY = "document.querySelector('#messages li.assistant:last-child .content')?.textContent.length"


def choose_temperature(page, value: str) -> None:
    """Save `value` as the open conversation's temperature (making one if none is open) in its settings panel.
    At 0 SmolLM2 answers these tests' prompts greedily: the same short reply every run, where a sampled one may
    ramble until the context window is full."""
    page.click("#settings-toggle")
    page.evaluate("value => { const t = document.querySelector('#temperature'); t.value = value;"
                  " t.dispatchEvent(new Event('input')); }", value)
    assert page.inner_text("#temperature-value") == f"{float(value):.1f}"
    page.click("#settings-save")
    page.locator("#settings-saved", has_text="Saved").wait_for()
    page.click("#settings-toggle")


@pytest.fixture(scope="module")
def chatter(gateway, node, api_key, tmp_path_factory):
    """The chat's three models (SmolLM2 on the node, the same as a remote upstream, a simulated long talker)
    and a user, "chatter", shared by the one-feature tests below."""
    from tests.processes import SimulatedNodes

    _user(gateway, "chatter")
    node.wait_for_model(MODEL_ID)
    remove_remote = _remote_upstream(gateway, api_key)
    long_talker = SimulatedNodes(gateway=gateway, log_dir=tmp_path_factory.mktemp("long-talker"), model=LONG_MODEL,
                                 tokens=4000, token_rate=20, prefix="long-talker")
    long_talker.start()
    try:
        yield gateway
    finally:
        remove_remote()
        long_talker.stop()


class ChatPage:
    """A signed-in chat page of "chatter" with every model listed; CSP refusals and script errors are kept."""

    def __init__(self, browser, gateway, name: str, width: int = 1280) -> None:
        self.problems: list[str] = []
        self.name = name
        self.context, self.page = _signed_in(browser, gateway, "chatter", self.problems, width=width)
        self.response = self.page.goto(gateway.url + "/")  # the chat is the gateway's front page
        for model in (MODEL_ID, REMOTE_MODEL, LONG_MODEL):
            self.page.wait_for_function(
                f"() => [...document.querySelectorAll('#model option')].some(o => o.value === {model!r})")

    def __enter__(self) -> ChatPage:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            assert not self.problems, self.problems
        else:
            _evidence(self.page, f"{self.name}-failure")
        self.context.close()

    def new_chat(self, model: str = MODEL_ID) -> None:
        """New Chat (which makes and opens a conversation at once), then choose `model` for it."""
        listed = self.page.locator("#conversations li").count()
        self.page.click("#new-chat")
        self.page.wait_for_function(f"() => document.querySelectorAll('#conversations li').length === {listed + 1}"
                                    " && document.querySelector('#title').textContent === 'New chat'")
        self.page.select_option("#model", model)

    def send(self, text: str, *, stop: bool = False) -> None:
        """Send `text` and wait for the reply to end; with `stop`, Stop it once some of it has shown."""
        page = self.page
        page.fill("#input", text)
        page.keyboard.press("Enter")
        page.locator("#messages li.user", has_text=text.splitlines()[0]).last.wait_for()
        if stop:
            self.stop_after_some_text()
        else:
            page.locator("#send:not([hidden])").wait_for(timeout=120_000)

    def stop_after_some_text(self) -> None:
        """Let the reply that has begun show some text, then Stop it (if it has not ended by then)."""
        self.page.wait_for_function(f"() => {LAST_REPLY} > 0")
        self.page.evaluate("() => document.querySelector('#stop').click()")  # a no-op if it has just ended
        self.page.locator("#send:not([hidden])").wait_for()


def test_enter_sends_shift_enter_breaks_the_line_and_the_model_titles_the_chat(chatter, browser) -> None:
    with ChatPage(browser, chatter, "chat-send") as chat:
        page = chat.page
        assert "script-src 'self'" in chat.response.headers["content-security-policy"]
        chat.new_chat()
        choose_temperature(page, "0")
        page.click("#input")
        page.keyboard.type("Say hello.")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("Briefly.")
        assert page.input_value("#input") == "Say hello.\nBriefly."
        page.keyboard.press("Enter")
        page.locator("#messages li.user", has_text="Briefly.").wait_for()
        page.wait_for_function(f"() => {LAST_REPLY} > 0")  # the reply streams in
        page.locator("#send:not([hidden])").wait_for(timeout=120_000)
        assert page.inner_text("#run-status").startswith("Finished in ")
        # The title shown is the one the model wrote (as the API says), in the bar and in the list.
        signed_in = httpx.post(chatter.url + "/api/auth/login", json={"username": "chatter", "password": PASSWORD,
                                                                       "deviceId": "check"}).json()
        deadline = time.monotonic() + 30  # the title comes after the reply, which frees the composer at once
        while (saved := httpx.get(chatter.url + "/optima/v1/conversations", headers={
                "Authorization": f"Bearer {signed_in['access_token']}"}).json()["data"][0])["titleSource"] != "model":
            assert time.monotonic() < deadline, saved
            time.sleep(0.1)
        page.locator("#title", has_text=saved["title"]).wait_for()
        assert page.inner_text("#title") == saved["title"] == page.inner_text("#conversations li.active")


def test_a_new_system_prompt_is_saved_and_counted_by_the_models_tokenizer(chatter, browser, model_path) -> None:
    with ChatPage(browser, chatter, "chat-settings") as chat:
        page = chat.page
        chat.new_chat()
        choose_temperature(page, "0")
        chat.send("Hello there.")
        page.click("#settings-toggle")
        assert page.input_value("#system-prompt") == "You are a helpful assistant."
        system = f"System {_tokens(model_path, 'You are a helpful assistant.')}"
        page.locator("#context-legend li[data-part=system]", has_text=system).wait_for()
        pirate = "You are a pirate. Answer every message like a pirate would, with plenty of arr and matey."
        page.fill("#system-prompt", pirate)
        page.evaluate("() => { const t = document.querySelector('#temperature'); t.value = '0.3';"
                      " t.dispatchEvent(new Event('input')); }")
        assert page.inner_text("#temperature-value") == "0.3"
        page.click("#settings-save")
        page.locator("#settings-saved", has_text="Saved").wait_for()
        system = f"System {_tokens(model_path, pirate)}"
        page.locator("#context-legend li[data-part=system]", has_text=system).wait_for()
        assert page.locator("#context span").count() >= 4  # System, User, AI, Template
        page.click("#context-view")
        assert page.locator("#context.context-grid span").count() == 100
        page.screenshot(path=str(ARTIFACTS / "chat-settings.png"), full_page=True)


def test_stop_keeps_the_partial_reply_marked_and_regenerate_replaces_it(chatter, browser) -> None:
    with ChatPage(browser, chatter, "chat-stop") as chat:
        page = chat.page
        chat.new_chat(LONG_MODEL)
        # A long reply: tokens arrive one after another; Stop ends it and the partial reply stays, marked.
        page.fill("#input", "Count from 1 to 1000, one number per line.")
        page.keyboard.press("Enter")
        page.locator("#stop:not([hidden])").wait_for()
        page.wait_for_function(f"() => document.querySelectorAll('#messages li.assistant').length === 1"
                               f" && {LAST_REPLY} > 3")
        first = page.evaluate(f"() => {LAST_REPLY}")
        page.wait_for_function(f"() => {LAST_REPLY} > {first}")  # more text came after the first pieces
        page.click("#stop")
        page.locator("#messages li.assistant.stopped").wait_for()
        page.locator("#send:not([hidden])").wait_for()
        assert page.inner_text("#run-status").startswith("Stopped after ")
        page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
        page.reload()
        page.locator("#messages li.assistant.stopped .mark", has_text="Stopped").wait_for()  # kept on the server

        # Regenerate replaces the last reply, here with SmolLM2's (stopped if it is still running).
        page.select_option("#model", MODEL_ID)
        stopped = page.inner_text("#messages li.assistant:last-child .content")
        page.click("#regenerate")
        chat.stop_after_some_text()
        assert page.locator("#messages li.assistant").count() == 1
        page.reload()
        page.locator("#messages li.assistant").first.wait_for()
        assert page.locator("#messages li.assistant").count() == 1, "the old reply was replaced, on the server too"
        assert page.inner_text("#messages li.assistant:last-child .content") != stopped


def test_a_conversation_answers_from_and_remembers_the_model_it_switched_to(chatter, browser) -> None:
    with ChatPage(browser, chatter, "chat-switch") as chat:
        page = chat.page
        chat.new_chat(MODEL_ID)
        chat.send("Hi", stop=True)
        page.select_option("#model", REMOTE_MODEL)
        chat.send("Hi again", stop=True)
        page.locator("#messages li.assistant:last-child .message-tools", has_text=REMOTE_MODEL).wait_for()
        page.reload()
        page.locator("#messages li.assistant:last-child .message-tools", has_text=REMOTE_MODEL).wait_for()
        assert page.input_value("#model") == REMOTE_MODEL, "the conversation remembers its model"


def test_what_a_user_writes_is_shown_as_text_and_nothing_in_it_runs(chatter, browser) -> None:
    with ChatPage(browser, chatter, "chat-xss") as chat:
        page = chat.page
        chat.new_chat()
        chat.send(XSS, stop=True)
        assert page.locator("#messages li.user").last.inner_text() == XSS
        assert page.locator("#messages img, #messages script, #messages svg, #messages li.user a").count() == 0
        assert page.evaluate("() => window.__xss") is None


def test_rename_search_by_title_and_by_what_was_said_and_delete(chatter, browser) -> None:
    with ChatPage(browser, chatter, "chat-organise") as chat:
        page = chat.page
        chat.new_chat(LONG_MODEL)
        chat.send("Name every lighthouse keeper, one name per line.", stop=True)
        page.once("dialog", lambda d: d.accept("Keepers of the light"))
        page.click("#rename")
        page.locator("#conversations li", has_text="Keepers of the light").wait_for()
        chat.new_chat(LONG_MODEL)
        chat.send("Tell me about harbours.", stop=True)
        listed = page.locator("#conversations li").count()
        page.fill("#search", "keepers of the")  # the title
        page.wait_for_function("() => document.querySelectorAll('#conversations li').length === 1"
                               " && document.querySelector('#conversations li').textContent === 'Keepers of the light'")
        page.fill("#search", "one name per line")  # what was said in it
        page.wait_for_function("() => document.querySelectorAll('#conversations li').length === 1"
                               " && document.querySelector('#conversations li').textContent === 'Keepers of the light'")
        page.fill("#search", "")
        page.wait_for_function(f"() => document.querySelectorAll('#conversations li').length === {listed}")
        page.locator("#conversations li", has_text="Keepers of the light").click()
        page.locator("#title", has_text="Keepers of the light").wait_for()
        page.once("dialog", lambda d: d.accept())
        page.click("#delete")
        page.wait_for_function(f"() => document.querySelectorAll('#conversations li').length === {listed - 1}")
        assert page.locator("#conversations li", has_text="Keepers of the light").count() == 0


def test_at_phone_width_the_chat_is_one_column(chatter, browser) -> None:
    with ChatPage(browser, chatter, "chat-phone", width=390) as chat:
        page = chat.page
        chat.new_chat()
        chat.send("Hello from a phone.", stop=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(ARTIFACTS / "chat-phone.png"), full_page=True)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390 + 1


def test_a_models_reply_renders_markdown_code_and_thinking_and_nothing_in_it_runs(
        gateway, browser) -> None:
    for name in ("reader", "writer"):
        _user(gateway, name)
    _stored_reply(gateway, "reader")
    others = _stored_reply(gateway, "writer")
    problems: list[str] = []
    context, page = _signed_in(browser, gateway, "reader", problems, width=1100)
    try:
        page.goto(gateway.url + "/")
        reply = page.locator("#messages li.assistant")
        reply.locator(".code-block").wait_for()
        # Only this user's own conversation is listed (the writer has one just like it), and another user's
        # conversation cannot be opened with this page's credentials.
        assert page.locator("#conversations li").all_inner_texts() == ["Stored reply"]
        status = page.evaluate("""async (id) => {
            const token = (await (await fetch('/chat/token/', {method: 'POST', headers: {'X-CSRFToken':
                document.getElementById('chat').dataset.csrf}})).json()).access_token;
            const headers = {Authorization: 'Bearer ' + token};
            return (await fetch('/optima/v1/conversations/' + id, {headers})).status;
        }""", others)
        assert status == 404

        # Nothing the model wrote became an element that can run or load anything, and nothing ran.
        assert page.locator("#messages script, #messages img, #messages svg, #messages iframe").count() == 0
        links = reply.locator("a")
        assert links.count() == 1 and links.first.get_attribute("href") == "https://example.com/docs"
        assert links.first.get_attribute("rel") == "noopener noreferrer nofollow"
        text = reply.inner_text()
        assert "<script>window.__xss = 1</script>" in text and "[bad link](javascript:window.__xss=6)" in text
        assert page.evaluate("() => window.__xss") is None

        # Markdown and highlighted code with a copy button.
        assert reply.locator("strong").inner_text() == "bold"
        assert reply.locator("ul li").all_inner_texts() == ["one", "two"]
        code = reply.locator(".code-block pre")
        assert code.inner_text() == CODE
        assert code.locator(".tok-keyword").all_inner_texts() == ["def", "return"]
        assert code.locator(".tok-string").inner_text() == '"world"'
        assert code.locator(".tok-comment").inner_text() == "# greet"
        reply.locator(".code-block button.copy").click()
        assert page.evaluate("() => navigator.clipboard.readText()") == CODE

        # The thinking block is folded once the run is over; a personal setting keeps such blocks open.
        thinking = reply.locator("details.block-think")
        assert thinking.count() == 1 and thinking.get_attribute("open") is None
        assert "<script>window.__xss = 5</script>" in thinking.text_content()
        page.click("#settings-toggle")
        page.check("#expand-blocks")
        page.wait_for_function("() => document.querySelector('details.block-think').open")
        page.screenshot(path=str(ARTIFACTS / "chat-markdown.png"), full_page=True)
        page.reload()
        page.locator("details.block-think[open]").wait_for()  # kept on the server, for every device
        assert page.is_checked("#expand-blocks")
        assert not problems, problems
    except Exception:
        _evidence(page, "chat-markdown-failure")
        raise
    finally:
        context.close()


# A reasoning model that uses a tool, scripted on a simulated node at 8 words a second: each phase lasts long
# enough to be seen.
THINKER_REPLY = ("<think> The user asks about the weather. I should look it up before I answer them. </think> "
                 '<tool_call> {"name": "weather", "arguments": {"city": "Oslo"}} </tool_call> '
                 '<tool_response> {"temperature": 3, "sky": "clear"} </tool_response> '
                 "It is **3 degrees** and clear in Oslo today, a fine evening for a walk by the water.")


def test_thinking_and_tool_blocks_show_the_runs_status_open_while_it_runs_and_fold_when_it_ends(
        browser, tmp_path) -> None:
    from tests.processes import Gateway, SimulatedNodes, free_port

    gateway = Gateway(data_dir=tmp_path, port=free_port())
    gateway.start()
    nodes = SimulatedNodes(gateway=gateway, log_dir=tmp_path, model="thinker", token_rate=8, reply=THINKER_REPLY)
    problems: list[str] = []
    context = None
    try:
        nodes.start()
        _user(gateway, "asker")
        context, page = _signed_in(browser, gateway, "asker", problems, width=1100)
        page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'thinker')")
        page.fill("#input", "What is the weather in Oslo?")
        page.keyboard.press("Enter")
        status = page.locator("#run-status")
        status.filter(has_text="Thinking...").wait_for()
        assert page.locator("#messages details.block-think[open]").count() == 1, "open while the model thinks"
        status.filter(has_text="Using tools (1)").wait_for()
        status.filter(has_text="Responding...").wait_for()
        page.locator("#send:not([hidden])").wait_for()
        assert re.fullmatch(r"Used 1 tool in \d+\.\ds", status.inner_text()), status.inner_text()
        reply = page.locator("#messages li.assistant")
        assert reply.locator("details").count() == 3  # thinking, the call, its result
        assert reply.locator("details[open]").count() == 0, "folded once the run is over"
        assert reply.locator("details summary").all_inner_texts() == ["Thinking", "Tool call", "Tool result"]
        assert reply.locator("strong").inner_text() == "3 degrees"
        reply.locator("details.block-tool-call summary").click()
        assert '"city": "Oslo"' in reply.locator("details.block-tool-call").inner_text()
        page.screenshot(path=str(ARTIFACTS / "chat-thinking.png"), full_page=True)
        assert not problems, problems
    except Exception:
        if context is not None:
            _evidence(page, "chat-thinking-failure")
        raise
    finally:
        if context is not None:
            context.close()
        nodes.stop()
        gateway.stop()
