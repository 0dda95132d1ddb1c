"""Executors with real processes: discovery, settings applied by restart, crash and hang recovery, invalid files,
one model id over two nodes, a second real model (gemma), embedding folders, and who may manage them.

One gateway and node agent for the module, with folders of their own: these tests add, remove and break files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from node_agent.default_model import CATALOG, ensure_model, sha256_file
from tests.conftest import MODEL_ID, NO_END
from tests.processes import REPO, Gateway, NodeAgent, free_port, wait_for

pytestmark = pytest.mark.e2e

SMOL = CATALOG["smollm2"].filename
# How the agent's debug log shows a request arriving over the link (the websockets library logs each frame).
REQUEST_FRAME = "< TEXT '{\"type\":\"request\""



def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class Stack:
    def __init__(self, gateway: Gateway, agent: NodeAgent, chat_dir: Path, embed_dir: Path, admin_key: str) -> None:
        self.gateway = gateway
        self.agent = agent
        self.chat_dir = chat_dir
        self.embed_dir = embed_dir
        self.admin_key = admin_key

    def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.request(method, self.gateway.url + path, headers=headers, timeout=90, **kwargs)

    def executors(self) -> dict[str, dict[str, Any]]:
        response = self.api("GET", "/optima/v1/executors")
        assert response.status_code == 200, response.text
        return {e["key"]: e for e in response.json()["data"] if e["node"] and e["node"]["name"] == "exec-node"}

    def executor(self, key: str) -> dict[str, Any] | None:
        return self.executors().get(key)

    def wait_state(self, key: str, state: str, timeout_s: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (e := self.executor(key)) is not None and e["state"] == state and e,
                        timeout_s, f"{key} to be {state}")

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=self.admin_key, max_retries=0, timeout=60)


def worker_processes(agent: NodeAgent) -> list[psutil.Process]:
    """The agent's live inference processes (a killed one not yet reaped is not one)."""
    assert agent.proc is not None
    found = []
    for process in psutil.Process(agent.proc.pid).children(recursive=True):
        try:
            if "node_agent.runtimes.llama_cpp_worker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # ended, or a zombie, since we listed it
            continue
    return found


def workers_of(agent: NodeAgent, file_name: str) -> list[psutil.Process]:
    return [p for p in worker_processes(agent) if any(a.endswith("/" + file_name) for a in p.cmdline())]


def arg_of(process: psutil.Process, flag: str) -> str:
    argv = process.cmdline()
    return argv[argv.index(flag) + 1]


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("executors")
    chat_dir, embed_dir = root / "chat", root / "embed"
    link(model_path, chat_dir / SMOL)
    link(model_path, embed_dir / "smol-embed.gguf")
    (root / "gw").mkdir()
    gateway = Gateway(data_dir=root / "gw", port=free_port())
    gateway.start()
    subprocess.run([sys.executable, "manage.py", "create_user", "boss", "--type", "admin"], cwd=REPO,
                   env=gateway.env, input="a-long-admin-password\n", text=True, check=True, capture_output=True)
    admin_key = gateway.manage("create_api_key", "--name", "boss", "--user", "boss", "--scopes", "inference",
                               "management").strip()
    agent = NodeAgent(gateway=gateway, models_dir=chat_dir, state_dir=root / "node", name="exec-node",
                      extra_args=("--embedding-models-dir", str(embed_dir), "--hang-timeout", "3"),
                      enable=(SMOL, "smol-embed.gguf"))
    (root / "node").mkdir()
    agent.start()
    try:
        agent.wait_for_model(MODEL_ID)
        yield Stack(gateway, agent, chat_dir, embed_dir, admin_key)
    finally:
        agent.stop()
        gateway.stop()


def test_a_dropped_file_appears_offline_with_its_header_and_hash_then_starts_and_goes_away(
        stack: Stack, model_path: Path) -> None:
    link(model_path, stack.chat_dir / "drop" / "Dropped.gguf")
    dropped = stack.wait_state("drop/Dropped.gguf", "offline", 15)
    assert dropped["model_id"] == "dropped" and dropped["enabled"] is False
    assert (dropped["family"], dropped["architecture"], dropped["quantization"]) == ("smollm2", "llama", "Q4_1")
    assert dropped["parameter_count"] == 134515008 and dropped["context_length"] == 8192
    assert dropped["size_bytes"] == model_path.stat().st_size
    assert "135M parameters" in dropped["description"]
    wait_for(lambda: stack.executor("drop/Dropped.gguf")["sha256"] == sha256_file(model_path), 15, "the hash")
    models = stack.api("GET", "/v1/models").json()["data"]
    assert "dropped" not in {m["id"] for m in models}, "an offline executor is not offered"

    started = stack.api("POST", f"/optima/v1/executors/{dropped['id']}/start")
    assert started.status_code == 200, started.text
    stack.wait_state("drop/Dropped.gguf", "online")
    reply = stack.openai().chat.completions.create(model="dropped", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3)
    assert reply.usage.completion_tokens <= 3

    (stack.chat_dir / "drop" / "Dropped.gguf").unlink()
    wait_for(lambda: stack.executor("drop/Dropped.gguf") is None, 15, "the executor to go")
    assert not workers_of(stack.agent, "Dropped.gguf"), "its process ended with its file"
    assert "dropped" not in {m["id"] for m in stack.api("GET", "/v1/models").json()["data"]}


def test_changing_the_context_window_restarts_the_process_with_the_new_value(stack: Stack) -> None:
    smol = stack.wait_state(SMOL, "online")
    (before,) = workers_of(stack.agent, SMOL)
    response = stack.api("PATCH", f"/optima/v1/executors/{smol['id']}", json={"n_ctx": 1024})
    assert response.status_code == 200, response.text
    assert response.json()["settings"]["n_ctx"] == 1024
    after = stack.wait_state(SMOL, "online")
    assert after["n_ctx"] == 1024, "the running process reports the window it was started with"
    (worker,) = workers_of(stack.agent, SMOL)
    assert worker.pid != before.pid and arg_of(worker, "--n-ctx") == "1024"
    # A description or an alias needs no restart.
    stack.api("PATCH", f"/optima/v1/executors/{smol['id']}", json={"description": "the small one"})
    assert workers_of(stack.agent, SMOL)[0].pid == worker.pid
    assert stack.executor(SMOL)["description"] == "the small one"


def test_a_reply_cap_and_a_chat_format_override_reach_the_process(stack: Stack) -> None:
    smol = stack.wait_state(SMOL, "online")
    response = stack.api("PATCH", f"/optima/v1/executors/{smol['id']}",
                         json={"max_tokens": 3, "chat_format": "chatml"})
    assert response.status_code == 200, response.text
    stack.wait_state(SMOL, "online")
    (worker,) = workers_of(stack.agent, SMOL)
    assert arg_of(worker, "--chat-format") == "chatml" and arg_of(worker, "--max-tokens-cap") == "3"
    reply = stack.openai().chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=50, logit_bias=NO_END)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    stack.api("PATCH", f"/optima/v1/executors/{smol['id']}", json={"max_tokens": 0, "chat_format": ""})
    stack.wait_state(SMOL, "online")
    assert "--chat-format" not in workers_of(stack.agent, SMOL)[0].cmdline()


def test_kill_9_of_an_inference_process_is_recovered_within_5_s_and_a_request_meanwhile_is_served(
        stack: Stack) -> None:
    stack.wait_state(SMOL, "online")
    (worker,) = workers_of(stack.agent, SMOL)
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["reply"] = stack.openai().chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            result["error"] = exc

    killed_at = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    asker = threading.Thread(target=ask)
    asker.start()
    wait_for(lambda: (w := workers_of(stack.agent, SMOL)) and w[0].pid != worker.pid, 5, "a new process")
    stack.wait_state(SMOL, "online", 5)
    recovered_s = time.monotonic() - killed_at
    asker.join(30)
    assert "error" not in result, result.get("error")
    assert result["reply"].choices[0].finish_reason in ("stop", "length")
    assert recovered_s < 5
    print(f"\nkill -9 of the inference process: online again after {recovered_s:.2f} s")


def test_three_crashes_in_a_row_mark_it_failed_with_the_reason_and_start_retries_it(stack: Stack) -> None:
    smol = stack.wait_state(SMOL, "online")
    killed: list[int] = []

    def next_worker_or_failed() -> list[psutil.Process] | bool:
        if stack.executor(SMOL)["state"] == "failed":
            return True
        return [w for w in workers_of(stack.agent, SMOL) if w.pid not in killed]

    # Crashes within a minute of the process's start count as in a row (an earlier test may have made one).
    while (found := wait_for(next_worker_or_failed, 30, "a process to kill, or the give-up")) is not True:
        assert len(killed) < 3, "still restarting after three crashes in a row"
        os.kill(found[0].pid, signal.SIGKILL)
        killed.append(found[0].pid)
    failed = stack.wait_state(SMOL, "failed", 30)
    assert "exit code -9" in failed["error"]
    time.sleep(1)
    assert not workers_of(stack.agent, SMOL), "given up: no restart loop"
    assert stack.api("POST", f"/optima/v1/executors/{smol['id']}/start").status_code == 200
    assert stack.wait_state(SMOL, "online", 30)["error"] == ""


def test_invalid_files_are_reported_never_started_and_never_crash_loop(stack: Stack, model_path: Path) -> None:
    data = model_path.read_bytes()
    (stack.chat_dir / "truncated.gguf").write_bytes(data[: len(data) // 3])
    (stack.chat_dir / "four.gguf").write_bytes(b"GGUF")
    (stack.chat_dir / "notes.gguf").write_text("meeting notes\n" * 50)
    outside = stack.chat_dir.parent / "outside.gguf"
    link(model_path, outside)
    (stack.chat_dir / "escape.gguf").symlink_to(outside)
    for key in ("truncated.gguf", "four.gguf", "notes.gguf", "escape.gguf"):
        bad = stack.wait_state(key, "failed", 15)
        assert bad["valid"] is False and bad["error"], key
        refused = stack.api("POST", f"/optima/v1/executors/{bad['id']}/start")
        assert refused.status_code == 400 and "cannot be started" in refused.json()["error"]["message"], key
    assert "truncated" in stack.executor("truncated.gguf")["error"]
    assert "points outside" in stack.executor("escape.gguf")["error"]
    time.sleep(2)  # a crash loop would show as processes coming and going
    assert not [p for p in worker_processes(stack.agent)
                if any(n in " ".join(p.cmdline()) for n in ("truncated", "four.gguf", "notes", "escape", "outside"))]
    assert stack.agent.alive


def test_replicas_and_an_alias_serve_one_model_from_two_processes(stack: Stack) -> None:
    smol = stack.wait_state(SMOL, "online")
    response = stack.api("PATCH", f"/optima/v1/executors/{smol['id']}", json={"replicas": 2, "alias": "smol"})
    assert response.status_code == 200, response.text
    wait_for(lambda: stack.executor(SMOL)["replicas_online"] == 2, 60, "two replicas")
    assert len(workers_of(stack.agent, SMOL)) == 2
    assert "smol" in {m["id"] for m in stack.api("GET", "/v1/models").json()["data"]}
    reply = stack.openai().chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=2)
    assert reply.model == "smol"
    stack.api("PATCH", f"/optima/v1/executors/{smol['id']}", json={"replicas": 1, "alias": ""})
    wait_for(lambda: len(workers_of(stack.agent, SMOL)) == 1, 30, "back to one process")


def test_embedding_folders_serve_embeddings_only_and_are_listed_apart(stack: Stack) -> None:
    stack.wait_state("embed:smol-embed.gguf", "online")
    stack.wait_state(SMOL, "online")
    listed = stack.api("GET", "/optima/v1/models").json()
    embed = {m["id"]: m for m in listed["embed_models"]}
    assert embed["smol-embed"]["dimensions"] == 576
    assert "smol-embed" not in {m["id"] for m in listed["chat_models"]}
    chat = {m["id"]: m for m in listed["chat_models"]}
    assert chat[MODEL_ID]["ctx_max"] > 0 and chat[MODEL_ID]["owned_by"] == "optimagpt"
    vectors = stack.openai().embeddings.create(model="smol-embed", input=["a", "b"], encoding_format="float")
    assert [len(d.embedding) for d in vectors.data] == [576, 576]
    with pytest.raises(openai.BadRequestError, match="embeddings only"):
        stack.openai().chat.completions.create(model="smol-embed", messages=[{"role": "user", "content": "Hi"}])
    capabilities = stack.api("GET", "/optima/v1/capabilities").json()
    assert capabilities == {"canChat": True, "canEmbed": True, "numNodes": 1, "routing": "least_busy"}


def test_bad_settings_are_refused_with_a_reason_and_change_nothing(stack: Stack) -> None:
    smol = stack.wait_state(SMOL, "online")
    (worker,) = workers_of(stack.agent, SMOL)
    for body, words in (({"n_ctx": -1}, "n_ctx"), ({"replicas": 99}, "replicas"), ({"gpu": 1}, "unknown"),
                        ({"chat_format": "no-such-format"}, "chat format"), ({"enabled": "yes"}, "enabled")):
        response = stack.api("PATCH", f"/optima/v1/executors/{smol['id']}", json=body)
        assert response.status_code == 400 and words in response.json()["error"]["message"], (body, response.text)
    assert workers_of(stack.agent, SMOL)[0].pid == worker.pid
    assert stack.api("PATCH", "/optima/v1/executors/999999", json={}).status_code == 404


def test_managing_executors_needs_the_permission(stack: Stack) -> None:
    subprocess.run([sys.executable, "manage.py", "create_user", "pleb", "--type", "user"], cwd=REPO,
                   env=stack.gateway.env, input="a-long-user-password\n", text=True, check=True, capture_output=True)
    stack.gateway.manage("shell", "--no-imports", "-c",
                         "from accounts.models import User; from django.contrib.auth.models import Permission; "
                         "User.objects.get(username='pleb').user_permissions.add("
                         "Permission.objects.get(codename='access_gateway'))")
    pleb_key = stack.gateway.manage("create_api_key", "--name", "pleb", "--user", "pleb", "--scopes", "inference",
                                    "management").strip()
    ownerless_key = stack.gateway.create_api_key("ownerless")
    smol = stack.wait_state(SMOL, "online")
    for key in (pleb_key, ownerless_key):
        assert stack.api("GET", "/optima/v1/models", key=key).status_code == 200, "anyone with a key sees models"
        for method, path in (("GET", "/optima/v1/executors"), ("GET", f"/optima/v1/executors/{smol['id']}"),
                             ("PATCH", f"/optima/v1/executors/{smol['id']}"),
                             ("POST", f"/optima/v1/executors/{smol['id']}/stop"),
                             ("POST", "/optima/v1/executors"), ("DELETE", f"/optima/v1/executors/{smol['id']}")):
            response = stack.api(method, path, key=key, json={"n_ctx": 512})
            assert response.status_code == 403, (method, path, response.text)
    assert stack.executor(SMOL)["state"] == "online" and stack.executor(SMOL)["settings"]["n_ctx"] != 512


def test_stop_frees_the_process_and_enabled_models_start_again_after_a_node_restart(stack: Stack) -> None:
    embed = stack.wait_state("embed:smol-embed.gguf", "online")
    stopped = stack.api("POST", f"/optima/v1/executors/{embed['id']}/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "offline"
    assert not workers_of(stack.agent, "smol-embed.gguf"), "stopping ends the process"
    assert stack.agent.stop() == 0
    # Started again without --enable: only what the saved settings say runs.
    stack.agent.argv = [a for a in stack.agent.argv if not a.startswith("--enable=")]
    stack.agent.start()
    (worker,) = wait_for(lambda: workers_of(stack.agent, SMOL), 30, "the enabled model to start by itself")
    assert arg_of(worker, "--n-ctx") == "1024", "settings survive the restart"
    wait_for(lambda: stack.executor(SMOL)["node"]["connected"], 30, "the node to link again")
    stack.wait_state(SMOL, "online", 60)
    assert stack.executor("embed:smol-embed.gguf")["state"] == "offline", "a stopped model stays stopped"
    assert not workers_of(stack.agent, "smol-embed.gguf")


def test_a_hung_process_is_killed_and_counted_as_a_crash(stack: Stack) -> None:
    stack.wait_state(SMOL, "online")
    (worker,) = workers_of(stack.agent, SMOL)
    os.kill(worker.pid, signal.SIGSTOP)
    reply = stack.openai().chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length"), "the request waits for the new process"
    assert not psutil.pid_exists(worker.pid) or psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE
    assert "killed as hung" in stack.agent.log()


def test_one_model_id_on_two_nodes_is_one_entry_and_gemma_serves_beside_smollm2(
        stack: Stack, model_path: Path, tmp_path: Path) -> None:
    gemma = ensure_model(REPO / "models", "gemma3-270m")
    second_dir = tmp_path / "models"
    link(model_path, second_dir / SMOL)
    link(gemma, second_dir / gemma.name)
    second = NodeAgent(gateway=stack.gateway, models_dir=second_dir, state_dir=tmp_path / "node", name="second",
                       enable=("*.gguf",))
    (tmp_path / "node").mkdir()
    second.start()
    try:
        second.wait_for_model("gemma-3-270m-q4_k_m")
        stack.wait_state(SMOL, "online")
        ids = [m["id"] for m in stack.api("GET", "/v1/models").json()["data"]]
        assert ids.count(MODEL_ID) == 1
        listed = stack.api("GET", "/optima/v1/models").json()["chat_models"]
        assert [m["id"] for m in listed].count(MODEL_ID) == 1
        assert {m["id"]: m for m in listed}["gemma-3-270m-q4_k_m"]["ctx_max"] == 4096
        assert stack.api("GET", "/optima/v1/capabilities").json()["numNodes"] == 2
        executors = [e for e in stack.api("GET", "/optima/v1/executors").json()["data"] if e["model_id"] == MODEL_ID]
        assert {e["node"]["name"] for e in executors} == {"exec-node", "second"}
        # Both nodes serve the one model id: equally idle, they take turns.
        requests_seen = second.log().count(REQUEST_FRAME)
        client = stack.openai()
        for _ in range(4):
            client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        served_by_second = second.log().count(REQUEST_FRAME) - requests_seen
        assert served_by_second == 2, f"the second node served {served_by_second} of 4"
        reply = client.chat.completions.create(model="gemma-3-270m-q4_k_m", max_tokens=8,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
        assert "<start_of_turn>" not in reply.choices[0].message.content, "gemma's own turn format is used"
    finally:
        assert second.stop() == 0
