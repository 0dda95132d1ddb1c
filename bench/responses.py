"""Responses API benchmark: what /v1/responses costs over /v1/chat/completions, with real processes.

    .venv/bin/python bench/responses.py [--pairs 400] [--streams 8] [--tokens 200]

Interleaved in one run, so that a drift in the machine's speed hits both sides alike:

  1 token       a 1-token Responses call (stored, the default; and with store: false) against a 1-token
                chat completion (the baseline), on simulated nodes that answer at once: what remains is the
                gateway's own work (the translation both ways, the stored row).
  tokens/s      a streamed reply of up to --tokens tokens from SmolLM2 on a real node agent, the same prompt
                on both paths (greedy: the same tokens), from the first delta to the last.
  chain         the gateway's time to load a 20-turn previous_response_id chain (the answer's Server-Timing
                `history`), and a 1-token call that continues it against one with no chain.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node_agent.default_model import ensure_default_model  # noqa: E402
from tests.processes import Gateway, NodeAgent, SimulatedNodes, free_port  # noqa: E402

MODEL = "smollm2-135m-instruct-q4_1"
CHAT = {"model": "plain", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
RESPONSE = {"model": "plain", "max_output_tokens": 1, "input": "hi"}
STORY = "Write a very long story about a lighthouse keeper."


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(what: str, values: list[float], baseline: str = "") -> str:
    return (f"| {what:<48} | {statistics.median(values):>9.3f} | {pct(values, 0.9):>9.3f} | {len(values):>5} "
            f"| {baseline:<36} |")


def timed(client: httpx.Client, path: str, body: dict) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    return elapsed, response


def history_ms(response: httpx.Response) -> float:
    metric = response.headers["Server-Timing"]
    return float(metric.split("dur=")[1].split(",")[0])


def streamed_rate(client: httpx.Client, path: str, body: dict) -> tuple[float, int]:
    """Tokens per second from the first text delta to the last, and the tokens the reply had."""
    first = last = None
    tokens = 0
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("type") == "response.output_text.delta" or (event.get("choices") and (
                    event["choices"][0]["delta"].get("content"))):
                last = time.perf_counter()
                first = first or last
            if event.get("type") in ("response.completed", "response.incomplete"):
                tokens = event["response"]["usage"]["output_tokens"]
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    assert first is not None and last is not None and tokens > 1
    return (tokens - 1) / (last - first), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=400, help="1-token calls on each path")
    parser.add_argument("--streams", type=int, default=8, help="streamed replies on each path")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per streamed reply (at most)")
    parser.add_argument("--chain", type=int, default=20, help="turns of the previous_response_id chain")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="optimagpt-bench-responses-"))
    for part in ("gw", "node", "models"):
        (root / part).mkdir()
    model_path = ensure_default_model(REPO / "models")
    shutil.copy2(model_path, root / "models" / model_path.name)  # a link out of the folder is refused
    gateway = Gateway(data_dir=root / "gw", port=free_port())
    sims = SimulatedNodes(gateway=gateway, log_dir=root, prefix="plain", model="plain", slots=4)
    agent = NodeAgent(gateway=gateway, models_dir=root / "models", state_dir=root / "node", name="bench")
    figures: dict[str, list[float]] = {k: [] for k in ("chat", "resp", "resp_nostore", "diff", "chat_tps", "resp_tps",
                                                       "history", "chained", "unchained")}
    try:
        gateway.start()
        sims.start()
        agent.start()
        agent.wait_for_model(MODEL)
        headers = {"Authorization": f"Bearer {gateway.create_api_key('bench')}"}
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=300) as client:
            for _ in range(50):  # warm up every path
                timed(client, "/v1/chat/completions", CHAT)
                timed(client, "/v1/responses", RESPONSE)
                timed(client, "/v1/responses", {**RESPONSE, "store": False})
            for _ in range(args.pairs):
                chat = timed(client, "/v1/chat/completions", CHAT)[0]
                resp = timed(client, "/v1/responses", RESPONSE)[0]
                figures["chat"].append(chat)
                figures["resp"].append(resp)
                figures["diff"].append(resp - chat)
                figures["resp_nostore"].append(timed(client, "/v1/responses", {**RESPONSE, "store": False})[0])

            story_chat = {"model": MODEL, "max_tokens": args.tokens, "temperature": 0, "stream": True,
                          "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": STORY}]}
            story_resp = {"model": MODEL, "max_output_tokens": args.tokens, "temperature": 0, "stream": True,
                          "input": STORY}
            streamed_rate(client, "/v1/chat/completions", story_chat)  # the prompt evaluated once, for both
            lengths = set()
            for i in range(args.streams):
                # Which path goes first alternates, so that neither always follows the other.
                sides = [("chat_tps", "/v1/chat/completions", story_chat), ("resp_tps", "/v1/responses", story_resp)]
                for name, path, body in sides if i % 2 == 0 else sides[::-1]:
                    rate, tokens = streamed_rate(client, path, body)
                    figures[name].append(rate)
                    lengths.add(tokens)

            previous = None
            for turn in range(args.chain):
                body = {**RESPONSE, "input": f"turn {turn}: " + "words " * 20}
                previous = timed(client, "/v1/responses", {**body, **({"previous_response_id": previous}
                                                                      if previous else {})})[1].json()["id"]
            for _ in range(args.pairs // 2):
                chained, response = timed(client, "/v1/responses", {**RESPONSE, "store": False,
                                                                    "previous_response_id": previous})
                figures["chained"].append(chained)
                figures["history"].append(history_ms(response))
                figures["unchained"].append(timed(client, "/v1/responses", {**RESPONSE, "store": False})[0])
    finally:
        agent.stop()
        sims.stop()
        gateway.stop()

    print(f"| {'what':<48} | {'p50':>9} | {'p90':>9} | {'n':>5} | {'baseline':<36} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 11}|{'-' * 7}|{'-' * 38}|")
    print(row("1-token chat completion (ms, baseline)", figures["chat"]))
    print(row("1-token Responses call, stored (ms)", figures["resp"],
              f"{statistics.median(figures['resp']) - statistics.median(figures['chat']):+.3f} ms p50 (goal < 1)"))
    print(row("1-token Responses call, store: false (ms)", figures["resp_nostore"],
              f"{statistics.median(figures['resp_nostore']) - statistics.median(figures['chat']):+.3f} ms p50"))
    print(row("  per pair: Responses - chat (ms)", figures["diff"]))
    print(row("streamed chat completion (tokens/s, baseline)", figures["chat_tps"]))
    ratio = statistics.median(figures["resp_tps"]) / statistics.median(figures["chat_tps"]) - 1
    print(row("streamed Responses (tokens/s)", figures["resp_tps"], f"{ratio * 100:+.2f}% at p50"))
    pairs = [(r / c - 1) * 100 for r, c in zip(figures["resp_tps"], figures["chat_tps"], strict=True)]
    print(row("  per pair: Responses / chat - 1 (%)", pairs, "goal within 2% (the machine's drift cancels)"))
    print(row(f"loading a {args.chain}-turn chain (ms, Server-Timing)", figures["history"], "goal < 20 ms"))
    print(row(f"1-token call continuing the {args.chain}-turn chain (ms)", figures["chained"],
              f"{statistics.median(figures['chained']) - statistics.median(figures['unchained']):+.3f} ms p50 "
              "vs no chain"))
    print(row("1-token call with no chain (ms, baseline)", figures["unchained"]))
    print(f"\nstreamed replies were {sorted(lengths)} tokens long")


if __name__ == "__main__":
    main()
