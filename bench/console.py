"""Node console under load: 50 simulated nodes reporting metrics every second, and the pages an admin opens.

    .venv/bin/python bench/console.py [--nodes 50] [--seconds 30]

One gateway (the embedded default: SQLite, in-memory channel layer, one daphne process). Simulated nodes
are protocol-level: each dials the gateway, proves the access key, registers one executor, then sends a
metrics sample every second and a log line every 5 s and answers pings; no model runs. While they report,
a logged-in admin loads the Nodes page and one node's page over and over, and a console WebSocket counts
the live events it receives. The baseline is the same measurement before any node is linked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node_agent.protocol import new_nonce, node_proof  # noqa: E402
from tests.processes import NODE_ACCESS_KEY, Gateway, free_port  # noqa: E402


async def sim_node(url: str, origin: str, index: int, stop: asyncio.Event) -> None:
    """One simulated node: handshake, register, then metrics every second and a log line every 5 s."""
    from websockets.asyncio.client import connect

    node_id = str(uuid.uuid4())
    async with connect(url, origin=origin, ping_interval=None, max_size=1 << 24) as ws:
        hello = json.loads(await ws.recv())
        nonce = new_nonce()
        await ws.send(json.dumps({"type": "auth", "node_id": node_id, "name": f"sim-{index:03d}", "version": "sim",
                                  "nonce": nonce,
                                  "proof": node_proof(NODE_ACCESS_KEY, hello["nonce"], nonce, node_id)}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "register", "hardware": {"cpu": "sim", "cpu_count": 8, "ram_total": 32 << 30,
                                                                   "gpus": []},
                                  "executors": [{"key": "sim.gguf", "model_id": f"sim-{index % 5}", "state": "online",
                                                 "settings": {"enabled": True}, "replicas_online": 1}]}))

        async def answer() -> None:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "ping":
                    await ws.send(json.dumps({"type": "pong", "t": message.get("t")}))

        reader = asyncio.create_task(answer())
        tick = 0
        while not stop.is_set():
            await ws.send(json.dumps({"type": "metrics", "metrics": {
                "cpu_percent": (index * 7 + tick) % 100, "ram_used": (8 + tick % 4) << 30, "ram_total": 32 << 30,
                "gpus": []}}))
            if tick % 5 == 0:
                await ws.send(json.dumps({"type": "logs", "records": [
                    {"t": time.time(), "level": "INFO", "logger": "node_agent.sim", "message": f"tick {tick}"}]}))
            tick += 1
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
        reader.cancel()


async def console_events(url: str, cookie: str, seconds: float) -> int:
    from websockets.asyncio.client import connect

    count = 0
    origin = url.replace("ws://", "http://").split("/ws/")[0]
    async with connect(url, origin=origin, additional_headers={"Cookie": cookie}) as ws:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
                count += 1
            except TimeoutError:
                break
    return count


def page_latencies(browser: httpx.Client, paths: list[str], seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path in paths:
            started = time.perf_counter()
            response = browser.get(path)
            assert response.status_code == 200, (path, response.status_code)
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def measure(gateway: Gateway, browser: httpx.Client, paths: list[str], seconds: float) -> dict[str, float]:
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    proc = psutil.Process(gateway.started.pid)
    proc.cpu_percent(None)
    events = asyncio.create_task(console_events(gateway.url.replace("http://", "ws://") + "/ws/console/", cookie,
                                                seconds))
    latencies = await asyncio.to_thread(page_latencies, browser, paths, seconds)
    cpu = proc.cpu_percent(None)
    received = await events
    return {"p50": statistics.median(latencies), "p99": pct(latencies, 0.99), "max": max(latencies),
            "n": len(latencies), "events": received / seconds, "cpu": cpu}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-console-"))
    gateway = Gateway(data_dir=root, port=free_port())
    gateway.start()
    browser = gateway.admin_browser("bench-admin", "tulip-quarry-8841-xyz")
    try:
        baseline = await measure(gateway, browser, ["/manage/nodes/"], args.seconds / 3)
        stop = asyncio.Event()
        link = gateway.url.replace("http://", "ws://") + "/ws/node/"
        sims = [asyncio.create_task(sim_node(link, gateway.url, i, stop)) for i in range(args.nodes)]
        await asyncio.sleep(3)  # all linked and registered
        assert not any(t.done() for t in sims), [t.exception() for t in sims if t.done()]
        node_pk = subprocess.run([sys.executable, "manage.py", "shell", "--no-imports", "-c",
                                  "from nodes.models import Node; print(Node.objects.order_by('pk').first().pk)"],
                                 cwd=REPO, env=gateway.env, capture_output=True, text=True, check=True).stdout.strip()
        proc = psutil.Process(gateway.started.pid)
        proc.cpu_percent(None)
        await asyncio.sleep(10)
        idle_cpu = proc.cpu_percent(None)  # what 50 reporting nodes cost the gateway with no page open
        loaded = await measure(gateway, browser, ["/manage/nodes/", f"/manage/nodes/{node_pk}/"], args.seconds)
        stop.set()
        await asyncio.gather(*sims, return_exceptions=True)
    finally:
        browser.close()
        gateway.stop()

    print(f"\nNode console, one gateway process (SQLite, in-memory layer), {args.nodes} simulated nodes "
          f"reporting metrics every second, {args.seconds:.0f} s\n")
    print("| load | page loads | p50 ms | p99 ms | max ms | console events/s | gateway CPU % |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("no nodes (baseline), Nodes page", baseline),
                    (f"{args.nodes} nodes, Nodes page + node page", loaded)):
        print(f"| {name} | {r['n']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['events']:.1f} | "
              f"{r['cpu']:.0f} |")
    print(f"\nGateway CPU with the {args.nodes} nodes reporting and no page open: {idle_cpu:.0f} % of one core "
          "(page loads run back to back above, so their CPU is that of the loop).")


if __name__ == "__main__":
    asyncio.run(main())
