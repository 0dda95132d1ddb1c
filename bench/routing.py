"""Routing at scale with simulated nodes: throughput of one gateway process, node loss, memory per node.

    .venv/bin/python bench/routing.py [--seconds 15] [--concurrency 12 32] [--nodes 500] [--rounds 3]

Everything is a separate process: one gateway (daphne, the embedded default: SQLite and the
in-memory channel layer), the simulated nodes (`python -m node_agent.simulator`: the agent's own
link code, answering at once), and a load generator speaking plain HTTP/1.1 over kept-alive
connections (so that the client costs little of the machine's two cores).

1. Requests/s and latency of 1-token chat completions through the gateway to instant nodes,
   against a baseline in the same run: the same load on a bare ASGI app under daphne that answers
   a fixed JSON body (what the server stack alone allows on this machine).
2. Time to detect a node killed with SIGKILL (the link closes) and one stopped with SIGSTOP
   (half-open: heartbeats), and time to fail over: a request waiting on the lost node, answered
   by another.
3. Gateway memory per connected node: RSS with 500 simulated nodes linked and reporting metrics
   every 2 s, against the same gateway with none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backbone import wait_http  # noqa: E402
from tests.processes import Gateway, SimulatedNodes, base_env, free_port  # noqa: E402

BARE_APP = '''
async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = (b'{"id":"x","object":"chat.completion",'
            b'"choices":[{"index":0,"message":{"role":"assistant","content":"t0 "}}]}')
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


# -- load generator (runs in its own process) ------------------------------------
async def _client(host: str, port: int, request: bytes, stop_at: float, latencies: list[float],
                  errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, chunked = 0, False
            for line in head.split(b"\r\n"):
                name = line[:18].lower()
                if name.startswith(b"content-length:"):
                    length = int(line[15:])
                elif name.startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                    chunked = True
            if chunked:
                while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def _loadgen(url: str, key: str, concurrency: int, seconds: float) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "sim", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    warm: list[float] = []
    await asyncio.gather(*(_client(host, int(port), request, time.perf_counter() + 1.0, warm, [])
                           for _ in range(concurrency)))
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(*(_client(host, int(port), request, started + seconds, latencies, errors)
                           for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2] * 1000,
            "p99": latencies[int(len(latencies) * 0.99)] * 1000, "n": len(latencies), "errors": len(errors)}


def load(url: str, key: str, concurrency: int, seconds: float) -> dict[str, Any]:
    result = subprocess.run([sys.executable, __file__, "loadgen", url, key, str(concurrency), str(seconds)],
                            capture_output=True, text=True, timeout=seconds + 120)
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


# -- the measurements ----------------------------------------------------------------
@contextmanager
def bare_app_on(server: str, root: Path) -> Iterator[str]:
    """BARE_APP served by `server` ("daphne", or "uvicorn" with httptools and uvloop); its URL."""
    folder = root / f"bare-{server}"
    folder.mkdir()
    (folder / "bare_app.py").write_text(BARE_APP)
    port = free_port()
    argv = ([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "--verbosity", "0"]
            if server == "daphne" else
            [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
             "--http", "httptools", "--log-level", "warning", "--no-access-log"])
    process = subprocess.Popen([*argv, "bare_app:application"], cwd=folder, env=base_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def throughput(root: Path, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    gateway = Gateway(data_dir=root / "gw", port=free_port())
    (root / "gw").mkdir()
    gateway.start()
    # Enough slots that the measurement is of the gateway, not of a queue: 4 nodes x 16 requests at once.
    sims = SimulatedNodes(gateway=gateway, log_dir=root, count=4, slots=16, metrics_interval_s=3600)
    try:
        with bare_app_on("daphne", root) as bare_url:
            sims.start()
            key = gateway.create_api_key("bench")
            _wait_model(gateway, key)
            for round_ in range(args.rounds):
                for concurrency in args.concurrency:
                    rows.append((f"bare ASGI app on daphne (baseline), {concurrency} connections",
                                 load(bare_url, key, concurrency, args.seconds)))
                    rows.append((f"gateway -> 4 instant simulated nodes, {concurrency} connections",
                                 load(gateway.url, key, concurrency, args.seconds)))
                    print(f"round {round_ + 1}: {rows[-2][1]['rps']:.0f} vs {rows[-1][1]['rps']:.0f} req/s",
                          file=sys.stderr)
    finally:
        sims.stop()
        gateway.stop()
    return rows


def node_loss(root: Path, rounds: int) -> dict[str, list[float]]:
    """Per round: a request waits on a slow node (first token after 60 s) while a fast node is linked too;
    the slow node is killed (or stopped); when does the gateway notice, and when is the request answered?"""
    out: dict[str, list[float]] = {"kill_detect": [], "kill_failover": [], "stop_detect": [], "stop_failover": []}
    gateway = Gateway(data_dir=root / "loss", port=free_port())
    (root / "loss").mkdir()
    gateway.start()
    key = gateway.create_api_key("bench")
    try:
        for round_ in range(rounds):
            for how in ("kill", "stop"):
                slow = SimulatedNodes(gateway=gateway, log_dir=root, count=1, delay_s=60, prefix=f"slow{round_}{how}",
                                      metrics_interval_s=3600)
                slow.start()
                _wait_model(gateway, key)
                with httpx.Client(timeout=120) as client:
                    answer: dict[str, float] = {}

                    def ask(client: httpx.Client = client, answer: dict[str, float] = answer) -> None:
                        client.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                    json={"model": "sim", "max_tokens": 1,
                                          "messages": [{"role": "user", "content": "x"}]})
                        answer["at"] = time.monotonic()

                    import threading

                    thread = threading.Thread(target=ask)
                    thread.start()
                    time.sleep(0.5)  # routed to the only node: the slow one
                    fast = SimulatedNodes(gateway=gateway, log_dir=root, count=1, prefix=f"fast{round_}{how}",
                                          metrics_interval_s=3600)
                    fast.start()
                    _wait_nodes(gateway, key, 2)
                    assert slow.proc is not None
                    os.kill(slow.proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                    lost_at = time.monotonic()
                    _wait_nodes(gateway, key, 1, poll_s=0.01)
                    out[f"{how}_detect"].append(time.monotonic() - lost_at)
                    thread.join(60)
                    out[f"{how}_failover"].append(answer["at"] - lost_at)
                if how == "stop":
                    os.kill(slow.proc.pid, signal.SIGKILL)
                slow.stop()
                fast.stop()
                _wait_nodes(gateway, key, 0)
    finally:
        gateway.stop()
    return out


def memory(root: Path, nodes: int) -> dict[str, float]:
    gateway = Gateway(data_dir=root / "mem", port=free_port())
    (root / "mem").mkdir()
    gateway.start()
    try:
        key = gateway.create_api_key("bench")
        proc = psutil.Process(gateway.started.pid)
        _wait_model(gateway, key, expect=False)
        time.sleep(2)
        before = proc.memory_info().rss
        sims = SimulatedNodes(gateway=gateway, log_dir=root, count=nodes, prefix="mem")
        started = time.monotonic()
        sims.start(timeout_s=300)
        linked_s = time.monotonic() - started
        _wait_nodes(gateway, key, nodes, timeout_s=120)
        proc.cpu_percent(None)
        time.sleep(20)  # metrics every 2 s from each node: 250 samples/s written
        cpu = proc.cpu_percent(None)
        after = proc.memory_info().rss
        sims.stop()
    finally:
        gateway.stop()
    return {"before_mib": before / 2**20, "after_mib": after / 2**20, "per_node_kib": (after - before) / nodes / 1024,
            "link_all_s": linked_s, "cpu": cpu}


# -- helpers -------------------------------------------------------------------------
def _wait_model(gateway: Gateway, key: str, expect: bool = True, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        if any(m["id"] == "sim" for m in data["data"]) == expect:
            return
        time.sleep(0.1)
    raise TimeoutError("model sim")


def _wait_nodes(gateway: Gateway, key: str, count: int, timeout_s: float = 60, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            response = client.get(gateway.url + "/optima/v1/capabilities", headers={"Authorization": f"Bearer {key}"})
            if response.json().get("numNodes", 0) == count:
                return
            time.sleep(poll_s)
    raise TimeoutError(f"{count} nodes")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "loadgen":
        url, key, concurrency, seconds = sys.argv[2:6]
        print(json.dumps(asyncio.run(_loadgen(url, key, int(concurrency), float(seconds)))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[12, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "loss", "memory"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    print(f"{os.cpu_count()} cores; results below", file=sys.stderr)

    if "throughput" not in args.skip:
        rows = throughput(root, args)
        print(f"\n1-token chat completions, {args.seconds:.0f} s per run, {args.rounds} rounds interleaved\n")
        print("| path | req/s | p50 ms | p99 ms | requests | errors |")
        print("|---|---|---|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['n']} | {r['errors']} |")
        for name in dict(rows):
            runs = [r for n, r in rows if n == name]
            print(f"| **median: {name}** | {statistics.median(r['rps'] for r in runs):.0f} | "
                  f"{statistics.median(r['p50'] for r in runs):.2f} | {statistics.median(r['p99'] for r in runs):.2f} "
                  f"| | |")
    if "loss" not in args.skip:
        loss = node_loss(root, args.rounds)
        print("\nNode loss (heartbeat interval 2 s), seconds, median of rounds (min-max)\n")
        print("| event | detected | request failed over and answered |")
        print("|---|---|---|")
        for how, label in (("kill", "node process killed (SIGKILL)"),
                           ("stop", "node process stopped (SIGSTOP, half-open)")):
            d, f = loss[f"{how}_detect"], loss[f"{how}_failover"]
            print(f"| {label} | {statistics.median(d):.2f} ({min(d):.2f}-{max(d):.2f}) | "
                  f"{statistics.median(f):.2f} ({min(f):.2f}-{max(f):.2f}) |")
    if "memory" not in args.skip:
        m = memory(root, args.nodes)
        print(f"\nGateway memory with {args.nodes} simulated nodes linked (metrics every 2 s each)\n")
        print("| gateway RSS, no node | with nodes | per node | time to link all | gateway CPU while they report |")
        print("|---|---|---|---|---|")
        print(f"| {m['before_mib']:.0f} MiB | {m['after_mib']:.0f} MiB | {m['per_node_kib']:.0f} KiB | "
              f"{m['link_all_s']:.1f} s | {m['cpu']:.0f} % |")


if __name__ == "__main__":
    main()
