"""Executor lifecycle benchmark: how long discovery, start, restart and crash recovery take, with real processes.

    .venv/bin/python bench/executors.py [--rounds 5]

A gateway and a node agent (rescanning every second, as in the tests) serve SmolLM2 from a folder of
their own. Each round measures, through the API an admin uses:
  discovery   a file dropped into the folder -> listed as an offline executor
  start       POST /start -> online (baseline: loading the same model in this process, llama_cpp.Llama)
  ctx change  PATCH n_ctx -> online again with the new window (a restart)
  kill -9     the inference process killed -> online again, and the latency of a 1-token request sent
              at the moment of the kill (baseline: the same request with nothing killed)
  stop        POST /stop -> process gone, and the memory (RSS) that process held
and, once, the latency a remote upstream adds: 1-token chat through a second gateway that has the
first one registered as a remote upstream, against the first gateway directly (same requests, interleaved).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node_agent.default_model import ensure_default_model  # noqa: E402
from tests.processes import Gateway, NodeAgent, free_port, wait_for  # noqa: E402

ONE_TOKEN = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1, "temperature": 0}


def wait_for_fast(predicate: Callable[[], Any], timeout_s: float = 60) -> Any:
    """Polled every 10 ms: these waits are what the bench times."""
    return wait_for(predicate, timeout_s, "the executor's state", interval_s=0.01)


class Admin:
    def __init__(self, gateway: Gateway, key: str) -> None:
        self.client = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def executor(self, key: str) -> dict[str, Any] | None:
        rows = self.client.get("/optima/v1/executors").json()["data"]
        return next((e for e in rows if e["key"] == key), None)

    def row(self, key: str) -> dict[str, Any]:
        executor = self.executor(key)
        assert executor is not None, f"no executor {key}"
        return executor

    def state(self, key: str) -> str:
        executor = self.executor(key)
        return executor["state"] if executor else "absent"

    def chat(self, model: str) -> float:
        started = time.perf_counter()
        response = self.client.post("/v1/chat/completions", json={"model": model, **ONE_TOKEN})
        assert response.status_code == 200, response.text
        return (time.perf_counter() - started) * 1000


def admin_for(gateway: Gateway, name: str) -> Admin:
    subprocess.run([sys.executable, "manage.py", "create_user", name, "--type", "admin"], cwd=REPO,
                   env=gateway.env, input="bench-password-123\n", text=True, check=True, capture_output=True)
    return Admin(gateway, gateway.manage("create_api_key", "--name", name, "--user", name).strip())


def workers(agent: NodeAgent, file_name: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(agent.started.pid).children(recursive=True):
        try:
            if any(arg.endswith("/" + file_name) for arg in process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def in_process_load_s(model: Path) -> float:
    code = ("import time, llama_cpp; t = time.perf_counter(); "
            f"llama_cpp.Llama(model_path={str(model)!r}, n_ctx=4096, n_threads=2, verbose=False); "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def row(name: str, values: list[float], unit: str, baseline: str = "") -> str:
    return (f"| {name:<34} | {statistics.median(values):>9.1f} | {max(values):>9.1f} | {unit:<4} | "
            f"{baseline:<38} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = ensure_default_model(REPO / "models")
    root = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    folder = root / "models"
    folder.mkdir()
    for d in ("gw", "gw2", "node"):
        (root / d).mkdir()
    gateway = Gateway(data_dir=root / "gw", port=free_port())
    front = Gateway(data_dir=root / "gw2", port=free_port())
    gateway.start()
    front.start()
    agent = NodeAgent(gateway=gateway, models_dir=folder, state_dir=root / "node", name="bench", enable=())
    agent.env["OPTIMAGPT_NODE_LOG_LEVEL"] = "INFO"
    agent.argv += ["--threads", "2"]
    agent.start()
    admin, front_admin = admin_for(gateway, "bench"), admin_for(front, "bench")
    figures: dict[str, list[float]] = {k: [] for k in ("discovery", "start", "ctx", "kill", "kill_req", "calm_req",
                                                          "stop", "rss")}
    try:
        for i in range(args.rounds):
            name = f"m{i}.gguf"
            dropped = time.perf_counter()
            os.link(model, folder / name)
            wait_for_fast(lambda name=name: admin.state(name) == "offline")
            figures["discovery"].append((time.perf_counter() - dropped) * 1000)
            pk = admin.row(name)["id"]

            started = time.perf_counter()
            admin.client.post(f"/optima/v1/executors/{pk}/start")
            wait_for_fast(lambda name=name: admin.state(name) == "online")
            figures["start"].append((time.perf_counter() - started) * 1000)
            model_id = admin.row(name)["model_id"]

            changed = time.perf_counter()
            admin.client.patch(f"/optima/v1/executors/{pk}", json={"n_ctx": 2048 if i % 2 else 1024})
            wait_for_fast(lambda name=name: (e := admin.executor(name)) and e["state"] == "online"
                          and e["n_ctx"] in (1024, 2048))
            figures["ctx"].append((time.perf_counter() - changed) * 1000)

            for _ in range(3):  # a fresh process's first requests fault its weights in: not what we compare
                admin.chat(model_id)
            figures["calm_req"].append(admin.chat(model_id))
            (worker,) = workers(agent, name)
            killed = time.perf_counter()
            os.kill(worker.pid, signal.SIGKILL)
            figures["kill_req"].append(admin.chat(model_id))
            wait_for_fast(lambda name=name, worker=worker: [w for w in workers(agent, name) if w.pid != worker.pid]
                          and admin.state(name) == "online")
            figures["kill"].append((time.perf_counter() - killed) * 1000)

            (worker,) = workers(agent, name)
            figures["rss"].append(worker.memory_info().rss / 2**20)
            stopped = time.perf_counter()
            admin.client.post(f"/optima/v1/executors/{pk}/stop")
            wait_for_fast(lambda name=name: not workers(agent, name))
            figures["stop"].append((time.perf_counter() - stopped) * 1000)
            (folder / name).unlink()
            wait_for_fast(lambda name=name: admin.state(name) == "absent")

        # The remote upstream's added latency: the same 1-token requests, direct and through a second gateway.
        os.link(model, folder / "remote.gguf")
        wait_for_fast(lambda name=name: admin.state("remote.gguf") == "offline")
        admin.client.post(f"/optima/v1/executors/{admin.row('remote.gguf')['id']}/start")
        wait_for_fast(lambda name=name: admin.state("remote.gguf") == "online")
        upstream_key = gateway.create_api_key("bench-upstream")
        created = front_admin.client.post("/optima/v1/executors", json={
            "name": "a", "model_id": "remote-smol", "base_url": gateway.url + "/v1", "upstream_model": "remote",
            "api_key": upstream_key})
        assert created.json()["state"] == "online", created.text
        direct, remote = [], []
        for _ in range(10):  # warm both paths
            admin.chat("remote")
            front_admin.chat("remote-smol")
        for _ in range(100):
            direct.append(admin.chat("remote"))
            remote.append(front_admin.chat("remote-smol"))
        baseline_load = [in_process_load_s(model) * 1000 for _ in range(3)]
    finally:
        agent.stop()
        gateway.stop()
        front.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nSmolLM2-135M-Instruct Q4_1, 2 threads, {args.rounds} rounds, rescan interval 1 s\n")
    print(f"| {'what':<34} | {'median':>9} | {'max':>9} | unit | {'baseline':<38} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|------|{'-' * 40}|")
    print(row("file dropped -> listed offline", figures["discovery"], "ms", "rescan interval 1000 ms"))
    print(row("start -> online", figures["start"], "ms",
              f"in-process load {statistics.median(baseline_load):.0f} ms"))
    print(row("n_ctx changed -> online again", figures["ctx"], "ms"))
    print(row("kill -9 -> online again", figures["kill"], "ms"))
    print(row("1-token request sent at the kill", figures["kill_req"], "ms",
              f"same request, nothing killed: {statistics.median(figures['calm_req']):.1f} ms"))
    print(row("stop -> process gone", figures["stop"], "ms"))
    print(row("memory freed by stop (worker RSS)", figures["rss"], "MiB"))
    print(row("1-token chat via a remote upstream", remote, "ms",
              f"direct to that gateway: {statistics.median(direct):.1f} ms"))


if __name__ == "__main__":
    main()
