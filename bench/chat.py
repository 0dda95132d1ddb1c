"""OptimaChat benchmark: what the conversation API costs over the bare OpenAI API, with real processes.

    .venv/bin/python bench/chat.py [--rounds 10]

A gateway and a node agent serve SmolLM2. Each round, interleaved so both see the same machine:
  first token   a new conversation's first message (its turn saved, history read, reply streamed as events)
                against the same messages streamed by POST /v1/chat/completions (baseline)
  title         from the reply's `done` event to the model's `title` event (one short unstreamed request)
  context       GET /conversations/{id}/context (the node's tokenizer) against a 1-token chat (baseline),
                and the same count while a long reply is being generated on the same node
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node_agent.default_model import ensure_default_model  # noqa: E402
from tests.processes import Gateway, NodeAgent, free_port  # noqa: E402

SYSTEM = "You are a helpful assistant."
QUESTION = "What is a lighthouse for? One sentence."


def ms(seconds: float) -> float:
    return seconds * 1000


def first_token_of_conversation(client: httpx.Client, model: str, system: str) -> tuple[float, float | None]:
    """Seconds to the first delta of a new conversation's first reply, and from `done` to `title`."""
    conversation = client.post("/optima/v1/conversations", json={"modelId": model, "temperature": 0,
                                                                 "systemPrompt": system}).json()
    started = time.perf_counter()
    first = done = None
    title = None
    with client.stream("POST", f"/optima/v1/conversations/{conversation['id']}/messages",
                       json={"content": QUESTION}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            kind = json.loads(line[6:])["type"]
            now = time.perf_counter()
            if kind == "delta" and first is None:
                first = now - started
            elif kind == "done":
                done = now
            elif kind == "title" and done is not None:
                title = now - done
    assert first is not None
    return first, title


def first_token_of_openai(client: httpx.Client, key: str, model: str, system: str) -> float:
    body = {"model": model, "stream": True, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]}
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and re.search(r'"content":"[^"]', line):
                return time.perf_counter() - started
    raise AssertionError("no token")


def timed(call) -> float:
    started = time.perf_counter()
    response = call()
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def row(what: str, values: list[float], baseline: str = "") -> str:
    return f"| {what:<44} | {statistics.median(values):>8.1f} | {max(values):>8.1f} | {baseline:<40} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    model_path = ensure_default_model(REPO / "models")
    model = "smollm2-135m-instruct-q4_1"
    root = Path(tempfile.mkdtemp(prefix="optimagpt-bench-chat-"))
    (root / "gw").mkdir()
    (root / "node").mkdir()
    (root / "models").mkdir()
    shutil.copy2(model_path, root / "models" / model_path.name)  # a link out of the folder is refused
    gateway = Gateway(data_dir=root / "gw", port=free_port())
    gateway.start()
    agent = NodeAgent(gateway=gateway, models_dir=root / "models", state_dir=root / "node", name="bench")
    try:
        agent.start()
        agent.wait_for_model(model)
        key = gateway.create_api_key("bench")
        headers = gateway.chat_user("bencher", "a-long-bench-password-1")
        figures: dict[str, list[float]] = {k: [] for k in ("conv", "openai", "title", "context", "one", "busy")}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=120) as client:
            first_token_of_conversation(client, model, SYSTEM)  # warm both paths
            first_token_of_openai(client, key, model, SYSTEM)
            # Each prompt starts differently, so neither path finds it already evaluated in llama.cpp's cache.
            for i in range(args.rounds):
                first, title = first_token_of_conversation(client, model, f"Round {i}a. {SYSTEM}")
                figures["conv"].append(ms(first))
                if title is not None:
                    figures["title"].append(ms(title))
                figures["openai"].append(ms(first_token_of_openai(client, key, model, f"Round {i}b. {SYSTEM}")))
            conversation = client.get("/optima/v1/conversations").json()["data"][0]["id"]
            one = {"model": model, "max_tokens": 1, "temperature": 0,
                   "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]}
            for _ in range(args.rounds):
                context_url = f"/optima/v1/conversations/{conversation}/context"
                figures["context"].append(ms(timed(lambda url=context_url: client.get(url))))
                figures["one"].append(ms(timed(lambda: client.post("/v1/chat/completions", json=one,
                                                                   headers={"Authorization": f"Bearer {key}"}))))
            # Counting while the node generates a long reply for someone else.
            long = {"model": model, "max_tokens": 2000, "logit_bias": {"2": -100}, "stream": False,
                    "messages": [{"role": "user", "content": "Write a very long story."}]}
            busy = threading.Thread(target=lambda: httpx.post(gateway.url + "/v1/chat/completions", json=long,
                                                              headers={"Authorization": f"Bearer {key}"}, timeout=600))
            busy.start()
            time.sleep(1.0)
            for _ in range(args.rounds):
                context_url = f"/optima/v1/conversations/{conversation}/context"
                figures["busy"].append(ms(timed(lambda url=context_url: client.get(url))))
            busy.join(600)
    finally:
        agent.stop()
        gateway.stop()

    print(f"\nSmolLM2-135M-Instruct Q4_1 on one node, {args.rounds} rounds, times in ms\n")
    print(f"| {'what':<44} | {'median':>8} | {'max':>8} | {'baseline':<40} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 42}|")
    print(row("first token, new conversation's first message", figures["conv"],
              f"/v1/chat/completions: {statistics.median(figures['openai']):.1f} median"))
    print(row("OpenAI API, same messages (baseline)", figures["openai"]))
    if figures["title"]:
        print(row("title written by the model (done -> title)", figures["title"],
                  f"{len(figures['title'])} of {args.rounds} titled"))
    print(row("context counts (node tokenizer)", figures["context"],
              f"1-token chat: {statistics.median(figures['one']):.1f} median"))
    print(row("1-token chat (baseline)", figures["one"]))
    print(row("context counts while the node generates", figures["busy"], "answered beside the generation"))


if __name__ == "__main__":
    main()
