"""MCP benchmark: what a tool round costs the gateway, and what registered MCP servers cost requests that use none.

    .venv/bin/python bench/mcp.py [--rounds 300]

Real processes: a gateway, simulated nodes (answering at once; one scripted to call the `add` tool of an
MCP server), and tests/mcp/server.py (the SDK's MCPServer over Streamable HTTP). Interleaved, so that a
drift in the machine's speed hits every path alike:

  tool round    a request whose model calls `add` once and then answers (two rounds to the node and one tool
                call), next to plain 1-token requests on the same gateway. The gateway's own time per tool
                round is what the answer's Server-Timing `mcp` says: from the round's end event to the next
                round sent to the node (reading the calls, building the messages, routing and sending),
                less the tool call's wall time (`tools`: the SDK's call_tool, to the MCP server and back).
  no MCP used   1-token requests that name no MCP server, with three MCP servers registered and with none;
                the servers are added and deleted between rounds, so both sides alternate in one run (and
                both follow the same admin work: three servers added and checked, then kept or deleted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import (  # noqa: E402
    Gateway,
    McpTestServer,
    SimulatedNodes,
    free_port,
    mcp_server_add,
    mcp_server_delete,
)

PLAIN = {"model": "plain", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
TOOL = {"model": "adder", "max_tokens": 1, "messages": [{"role": "user", "content": "add"}],
        "tools": [{"type": "mcp", "server_label": "calc"}]}


SETTLE_S = 0.5  # after servers are added or deleted (their checks, the page's requests), before measuring


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(what: str, values: list[float], baseline: str = "") -> str:
    return (f"| {what:<46} | {statistics.median(values):>8.3f} | {pct(values, 0.9):>8.3f} | {len(values):>5} "
            f"| {baseline:<34} |")


def timed(client: httpx.Client, headers: dict[str, str], body: dict) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", headers=headers, json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed * 1000, response


def server_timing(response: httpx.Response) -> dict[str, float]:
    """Server-Timing's metrics by name: `mcp;dur=1.2;desc="gateway", tools;dur=9.9` -> {mcp: 1.2, tools: 9.9}."""
    out = {}
    for metric in response.headers["Server-Timing"].split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        out[name] = next(float(p[4:]) for p in params if p.startswith("dur="))
    return out


def server_add(browser: httpx.Client, name: str, url: str) -> int:
    checked = mcp_server_add(browser, name, url=url)
    assert checked["status"] == "connected", checked
    return int(checked["id"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300, help="tool rounds measured (and as many plain pairs)")
    parser.add_argument("--blocks", type=int, default=60, help="alternations of three servers / none")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="optimagpt-bench-mcp-"))
    gateway = Gateway(data_dir=root, port=free_port())
    server = McpTestServer(log_dir=root)
    extra = [McpTestServer(log_dir=root, port=free_port()) for _ in range(3)]
    sims = [SimulatedNodes(gateway=gateway, log_dir=root, prefix="adder", model="adder", tool_call="add",
                           tool_args='{"a": 2, "b": 40}'),
            SimulatedNodes(gateway=gateway, log_dir=root, prefix="plain", model="plain")]
    try:
        gateway.start()
        for process in [server, *extra, *sims]:
            process.start()
        browser = gateway.admin_browser("bench", "a-long-admin-password-9")
        headers = {"Authorization": f"Bearer {gateway.create_api_key('bench')}"}
        server_add(browser, "calc", server.url)
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            for _ in range(30):  # warm up both paths (and the MCP session)
                timed(client, headers, PLAIN)
                timed(client, headers, TOOL)
            own, tool_ms, with_mcp, plain_ms = [], [], [], []
            for _ in range(args.rounds):
                plain_ms.append(timed(client, headers, PLAIN)[0])
                total, response = timed(client, headers, TOOL)
                (call,) = response.json()["mcp_calls"]
                assert call["output"] == "42", call
                timing = server_timing(response)
                with_mcp.append(total)
                tool_ms.append(timing["tools"])
                own.append(timing["mcp"])

            none_ms, three_ms, block_diffs = [], [], []
            per_block = max(1, args.rounds // args.blocks)
            for _ in range(args.blocks):
                # Both sides come after the same admin work (three servers added and checked), so that its
                # aftermath (the probes' garbage, say) weighs on both alike; only one side keeps them.
                for pk in [server_add(browser, f"extra-{i}", s.url) for i, s in enumerate(extra)]:
                    mcp_server_delete(browser, pk)
                time.sleep(SETTLE_S)
                none = [timed(client, headers, PLAIN)[0] for _ in range(per_block)]
                pks = [server_add(browser, f"extra-{i}", s.url) for i, s in enumerate(extra)]
                time.sleep(SETTLE_S)
                three = [timed(client, headers, PLAIN)[0] for _ in range(per_block)]
                for pk in pks:
                    mcp_server_delete(browser, pk)
                none_ms += none
                three_ms += three
                block_diffs.append(statistics.median(three) - statistics.median(none))
    finally:
        for process in [*sims, *extra, server]:
            process.stop()
        gateway.stop()

    print(f"| {'what (ms)':<46} | {'p50':>8} | {'p90':>8} | {'n':>5} | {'baseline':<34} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 7}|{'-' * 36}|")
    print(row("request with one MCP tool round", with_mcp))
    print(row("plain 1-token request (baseline)", plain_ms))
    print(row("tool call (SDK call_tool to the server, wall)", tool_ms))
    print(row("gateway's own time per tool round", own, "Server-Timing mcp (goal < 5 ms)"))
    print(row("1-token request, no MCP servers registered", none_ms))
    print(row("1-token request, 3 MCP servers registered", three_ms,
              f"{statistics.median(three_ms) - statistics.median(none_ms):+.3f} ms at p50 (goal 0.3)"))
    print(f"\nmedian over the {len(block_diffs)} alternations of (p50 with three servers - p50 with none): "
          f"{statistics.median(block_diffs):+.3f} ms")


if __name__ == "__main__":
    main()
