"""Soak: mixed load on one gateway and two real nodes for a long while, a node killed and restarted now and then.

    .venv/bin/python bench/soak.py [--minutes 30] [--clients 6] [--kill-every 300] [--report-every 60]

One gateway (daphne, the embedded default) and two node agents, each serving SmolLM2 with one thread;
`--clients` loops send, one after another, a mix of chat (short replies), streamed chat, embeddings, and
streams the client abandons midway (a cancellation). Every `--kill-every` seconds one node agent is killed
with SIGKILL and started again 10 s later. At the end it prints, per reporting window, requests by outcome
and p50/p99 latency, and the gateway's RSS and open files, and the growth of both per hour.

Outcomes: `ok` (answered in full), `abandoned` (the client left on purpose), `cut` (a stream that had sent
text when its node was killed: it ends with a node_disconnected error, as documented; resending would
repeat text), `refused` (a 4xx/503 with an OpenAI error body, e.g. while both nodes were away), and `lost`:
no answer at all, a timeout, or a 5xx without an error body. The goal is 0 lost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node_agent.default_model import ensure_default_model  # noqa: E402
from tests.processes import Gateway, NodeAgent, free_port  # noqa: E402

MODEL = "smollm2-135m-instruct-q4_1"
TIMEOUT_S = 120.0


@dataclass
class Window:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    open_files: int = 0


class Soak:
    def __init__(self, gateway: Gateway, key: str, report_every_s: float) -> None:
        self.gateway = gateway
        self.headers = {"Authorization": f"Bearer {key}"}
        self.report_every_s = report_every_s
        self.started = time.monotonic()
        self.windows: dict[int, Window] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.lost_samples: list[str] = []

    def _window(self) -> Window:
        index = int((time.monotonic() - self.started) // self.report_every_s)
        return self.windows.setdefault(index, Window())

    def record(self, outcome: str, latency_s: float, detail: str = "") -> None:
        with self.lock:
            window = self._window()
            window.outcomes[outcome] += 1
            if outcome == "ok":
                window.latencies.append(latency_s)
            if outcome == "lost" and len(self.lost_samples) < 20:
                self.lost_samples.append(detail[:300])

    def sample_gateway(self) -> None:
        process = psutil.Process(self.gateway.started.pid)
        with self.lock:
            window = self._window()
            window.rss_mb = process.memory_info().rss / 2**20
            window.open_files = process.num_fds()

    # -- one client's requests ------------------------------------------------------
    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.gateway.url, headers=self.headers, timeout=TIMEOUT_S) as http:
            while not self.stop.is_set():
                kind = rng.choices(["chat", "stream", "embed", "abandon"], weights=[4, 3, 2, 1])[0]
                started = time.monotonic()
                try:
                    outcome, detail = getattr(self, kind)(http, rng)
                except httpx.HTTPError as exc:
                    outcome, detail = "lost", f"{kind}: {type(exc).__name__}: {exc}"
                self.record(outcome, time.monotonic() - started, detail)

    @staticmethod
    def _judge(response: httpx.Response, kind: str) -> tuple[str, str]:
        if response.status_code == 200:
            return "ok", ""
        try:
            has_error_body = "error" in response.json()
        except ValueError:
            has_error_body = False
        if has_error_body and (response.status_code < 500 or response.status_code in (502, 503, 504)):
            return "refused", ""
        return "lost", f"{kind}: {response.status_code} {response.text[:200]}"

    def chat(self, http: httpx.Client, rng: random.Random) -> tuple[str, str]:
        response = http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": f"Say a word about {rng.randint(1, 999)}."}],
            "max_tokens": rng.randint(1, 24)})
        return self._judge(response, "chat")

    def embed(self, http: httpx.Client, rng: random.Random) -> tuple[str, str]:
        response = http.post("/v1/embeddings", json={
            "model": MODEL, "input": [f"text {rng.randint(1, 10**6)}" for _ in range(rng.randint(1, 8))]})
        return self._judge(response, "embed")

    def stream(self, http: httpx.Client, rng: random.Random, abandon_after: int | None = None) -> tuple[str, str]:
        chunks = 0
        with http.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": rng.randint(16, 64), "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                return self._judge(response, "stream")
            last = ""
            for line in response.iter_lines():
                if not line:
                    continue
                last = line
                chunks += 1
                if abandon_after is not None and chunks >= abandon_after:
                    return "abandoned", ""  # leaving the block closes the connection: the node must stop
        if last == "data: [DONE]":
            return "ok", ""
        if "node_disconnected" in last or "executor_lost" in last:
            return "cut", ""
        return "lost", f"stream ended with {last[:200]!r}"

    def abandon(self, http: httpx.Client, rng: random.Random) -> tuple[str, str]:
        return self.stream(http, rng, abandon_after=rng.randint(1, 3))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--kill-every", type=float, default=300.0, help="seconds between node kills")
    parser.add_argument("--report-every", type=float, default=60.0, help="seconds per reporting window")
    args = parser.parse_args()

    model = ensure_default_model(REPO / "models")
    root = Path(tempfile.mkdtemp(prefix="optimagpt-soak-"))
    models = root / "models"
    models.mkdir()
    try:
        os.link(model, models / model.name)  # a symbolic link out of the folder would be refused by the scan
    except OSError:
        shutil.copyfile(model, models / model.name)
    gateway = Gateway(data_dir=root / "gateway", port=free_port())
    (root / "gateway").mkdir()
    gateway.start()
    nodes = []
    for name in ("soak-a", "soak-b"):
        (root / name).mkdir()
        node = NodeAgent(gateway=gateway, models_dir=models, state_dir=root / name, name=name,
                         extra_args=("--threads", "1"))
        node.start()
        nodes.append(node)
    try:
        for node in nodes:
            node.wait_for_model(MODEL, timeout_s=120)
        soak = Soak(gateway, gateway.create_api_key("soak"), args.report_every)
        clients = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(args.clients)]
        for thread in clients:
            thread.start()
        ends_at = soak.started + args.minutes * 60
        next_kill = soak.started + args.kill_every
        kills = 0
        while time.monotonic() < ends_at:
            time.sleep(1.0)
            soak.sample_gateway()
            if time.monotonic() >= next_kill:
                victim = nodes[kills % len(nodes)]
                victim.started.send_signal(signal.SIGKILL)
                victim.started.wait()
                kills += 1
                name = victim.argv[victim.argv.index("--name") + 1]
                print(f"[{time.monotonic() - soak.started:7.0f} s] killed {name}", flush=True)
                time.sleep(10)
                victim.start()
                next_kill += args.kill_every
        soak.stop.set()
        for thread in clients:
            thread.join(TIMEOUT_S + 10)
    finally:
        for node in nodes:
            node.stop()
        gateway.stop()

    kinds = ["ok", "abandoned", "cut", "refused", "lost"]
    print(f"\nSoak: {args.minutes:g} min, {args.clients} clients, a node killed every {args.kill_every:g} s "
          f"({kills} kills), gateway + 2 nodes (SmolLM2, 1 thread each) on one machine\n")
    print("| from minute | " + " | ".join(kinds) + " | p50 ms | p99 ms | gateway RSS MB | open files |")
    print("|" + " --- |" * (len(kinds) + 5))
    total: Counter[str] = Counter()
    for index in sorted(soak.windows):
        w = soak.windows[index]
        total.update(w.outcomes)
        print(f"| {index * args.report_every / 60:.1f} | " + " | ".join(str(w.outcomes[k]) for k in kinds)
              + f" | {_pct(w.latencies, 0.5):.0f} | {_pct(w.latencies, 0.99):.0f} | {w.rss_mb:.1f} | {w.open_files} |")
    sampled = sorted(i for i, w in soak.windows.items() if w.rss_mb)  # the last window may be the clients' drain
    first, last = soak.windows[sampled[0]], soak.windows[sampled[-1]]
    hours = max((sampled[-1] - sampled[0]) * args.report_every / 3600, 1e-9)
    print("\nTotal: " + ", ".join(f"{k} {total[k]}" for k in kinds))
    print(f"Gateway RSS {first.rss_mb:.1f} -> {last.rss_mb:.1f} MB ({(last.rss_mb - first.rss_mb) / hours:+.1f} MB/h), "
          f"open files {first.open_files} -> {last.open_files} ({(last.open_files - first.open_files) / hours:+.1f}/h)")
    if soak.lost_samples:
        print("Lost, first few:", *soak.lost_samples, sep="\n  ")
    print(json.dumps({"lost": total["lost"], "total": sum(total.values())}))


if __name__ == "__main__":
    main()
