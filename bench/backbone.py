"""Backbone benchmark: the same requests on four paths, in one run, on this machine.

    .venv/bin/pip install -r requirements/bench.txt
    .venv/bin/python bench/backbone.py [--threads 2] [--quick]

Paths (all started first, then measured round-robin, one request at a time, so a drift in the
machine's speed hits every path alike):
  in-process   llama_cpp.Llama in this process (the physical limit)
  server       llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`), the baseline
  llama-server llama.cpp's own server, `--parallel 8 -c 8192`, built as bench/concurrency.py builds it
  worker       our inference process, straight over its pipe (node_agent.runtimes.llama_cpp)
  gateway      client -> daphne gateway -> channel layer -> node link -> node agent -> worker

Figures: latency of a 1-token chat request (p50, p90, and p50 added over in-process), time to
first token of a streamed reply, tokens/s of a streamed 128-token reply (end of text suppressed so
every run makes 128 tokens; min/median/max of several runs, to show a bimodal path), and requests/s
with 8 concurrent clients sending 1-token requests. HTTP paths use one httpx client with
kept-alive connections for all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node_agent.default_model import ensure_default_model  # noqa: E402
from node_agent.protocol import pipe_frame  # noqa: E402
from node_agent.runtimes.llama_cpp import ProcessConfig  # noqa: E402
from node_agent.settings import DEFAULT_STREAM_INTERVAL_MS  # noqa: E402
from tests.processes import Gateway, NodeAgent, free_port  # noqa: E402

MODEL_ID = "smollm2-135m-instruct-q4_1"
ONE_TOKEN = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1, "temperature": 0}
TTFT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}
EOS_TOKEN = 2  # SmolLM2's <|im_end|>... end of text: suppressed for the 128-token runs
LONG = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 128,
        "temperature": 0, "logit_bias": {str(EOS_TOKEN): -100}}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Result(dict):
    pass


# -- the paths: each offers the same four measurements ----------------------------------
class BenchPath:
    """One way to reach the model. Subclasses implement one request of each kind."""

    name = ""
    long_body: dict[str, Any] = LONG

    def one(self) -> None:
        raise NotImplementedError

    def _stream(self, body: dict[str, Any]) -> tuple[float, float, str | None]:
        """One streamed reply, read to its end: (seconds to first token, seconds in all, finish reason)."""
        raise NotImplementedError

    def ttft(self) -> float:
        return self._stream(TTFT)[0]

    def long(self) -> tuple[float, str | None]:
        """A streamed reply of max_tokens=128 with end of text suppressed: (seconds, finish reason)."""
        _, seconds, finish = self._stream(self.long_body)
        return seconds, finish

    def concurrent(self, clients: int, total: int) -> float | None:
        return None

    def close(self) -> None:
        pass


class InProcess(BenchPath):
    name = "in-process"
    long_body = {**LONG, "logit_bias": {EOS_TOKEN: -100}}  # llama_cpp wants token ids as ints

    def __init__(self, model: Path, threads: int) -> None:
        from llama_cpp import Llama

        # Flash attention on, as our worker's engine has it (llama-cpp-python leaves it off unless asked):
        # like for like, so the comparison is of the paths, not of the attention kernel.
        self.llm = Llama(model_path=str(model), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                         flash_attn=True, verbose=False)

    def one(self) -> None:
        self.llm.create_chat_completion(**ONE_TOKEN)

    def _stream(self, body: dict[str, Any]) -> tuple[int, float, float]:
        # Read the whole reply, as the other paths do: a reply left half-read keeps
        # the prompt's logits cached and flatters the next request.
        first, finish = None, None
        t = time.perf_counter()
        for chunk in self.llm.create_chat_completion(**body, stream=True):
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            if first is None and choice["delta"].get("content"):
                first = time.perf_counter() - t
        assert first is not None, "no token"
        return first, time.perf_counter() - t, finish



class Http(BenchPath):
    """An OpenAI-compatible HTTP server: llama-cpp-python's own, or our gateway."""

    def __init__(self, name: str, base: str, headers: dict[str, str], model: str) -> None:
        self.name = name
        self.base, self.headers, self.model = base, headers, model
        self.client = httpx.Client(base_url=base, headers=headers, timeout=120)

    def one(self) -> None:
        self.client.post("/v1/chat/completions", json={"model": self.model, **ONE_TOKEN}).raise_for_status()

    def _stream(self, body: dict[str, Any]) -> tuple[float, float, str | None]:
        first, finish = None, None
        t = time.perf_counter()
        with self.client.stream("POST", "/v1/chat/completions",
                                json={"model": self.model, "stream": True, **body}) as response:
            response.raise_for_status()
            for line in response.iter_lines():  # to the end, so the connection is reused
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                finish = choice.get("finish_reason") or finish
                if first is None and choice["delta"].get("content"):
                    first = time.perf_counter() - t
        assert first is not None, "no token"
        return first, time.perf_counter() - t, finish

    def concurrent(self, clients: int, total: int) -> float:
        async def run() -> float:
            async with httpx.AsyncClient(base_url=self.base, headers=self.headers, timeout=120,
                                         limits=httpx.Limits(max_connections=clients)) as aclient:
                remaining = 0

                async def worker() -> None:
                    nonlocal remaining
                    while remaining > 0:
                        remaining -= 1
                        response = await aclient.post("/v1/chat/completions", json={"model": self.model, **ONE_TOKEN})
                        response.raise_for_status()

                remaining = clients * 4
                await asyncio.gather(*(worker() for _ in range(clients)))  # open the connections
                remaining = total
                t = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(clients)))
                return total / (time.perf_counter() - t)

        return asyncio.run(run())

    def close(self) -> None:
        self.client.close()


class Worker(BenchPath):
    """Our inference process, spoken to over its pipe exactly as the node agent does."""

    name = "worker (pipe)"

    def __init__(self, model: Path, threads: int, stream_interval_ms: float) -> None:
        self.proc = subprocess.Popen(
            ProcessConfig(model_path=str(model), n_ctx=4096, threads=threads, n_gpu_layers=0,
                          stream_interval_ms=stream_interval_ms, parallel=8).argv(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
        assert json.loads(self.proc.stdout.readline())["type"] == "ready"
        self.ids = iter(range(10**9))

    def _send(self, body: dict[str, Any], stream: bool) -> str:
        rid = str(next(self.ids))
        request = {"op": "chat", "id": rid, "stream": stream, "body": body}
        self.proc.stdin.write(pipe_frame(json.dumps(request).encode()))
        self.proc.stdin.flush()
        return rid

    def _events(self) -> Iterator[dict[str, Any]]:
        while True:
            event = json.loads(self.proc.stdout.readline())
            yield event
            if event["type"] in ("end", "error"):
                return

    def one(self) -> None:
        self._send(ONE_TOKEN, False)
        for _ in self._events():
            pass

    def _stream(self, body: dict[str, Any]) -> tuple[float, float, str | None]:
        t = time.perf_counter()
        self._send(body, True)
        first, finish = None, None
        for event in self._events():
            if first is None and event["type"] == "delta":
                first = time.perf_counter() - t
            finish = event.get("finish_reason", finish)
        assert first is not None, "no token"
        return first, time.perf_counter() - t, finish

    def concurrent(self, clients: int, total: int) -> float:
        # The process serves one request at a time; queue them all, as busy clients would.
        t = time.perf_counter()
        for _ in range(total):
            self._send(ONE_TOKEN, False)
        for _ in range(total):
            for _ in self._events():
                pass
        return total / (time.perf_counter() - t)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def run_interleaved(paths: list[BenchPath], n_latency: int, n_long: int) -> dict[str, Result]:
    """Take every figure round-robin across paths, so drift in the machine's speed hits all alike."""
    samples: dict[str, dict[str, list[float]]] = {
        p.name: {"lat": [], "ttft": [], "tps": [], "ratio": [], "rps": []} for p in paths}
    for p in paths:
        for _ in range(10):
            p.one()  # warm up: prompt cache, connections
    for _ in range(n_latency // 10):
        for p in paths:
            for _ in range(10):
                t = time.perf_counter()
                p.one()
                samples[p.name]["lat"].append((time.perf_counter() - t) * 1000)
    for _ in range(10):
        for p in paths:
            samples[p.name]["ttft"].append(p.ttft() * 1000)
    for i in range(n_long):
        # Forward one round, backward the next: a steady drift in the machine's
        # speed then favours no path. Each path is compared with in-process within
        # its own round (the "ratio" samples), never across the whole run.
        for p in paths if i % 2 == 0 else reversed(paths):
            seconds, finish = p.long()
            # Stopped by max_tokens, so exactly 128 tokens were made.
            assert finish == "length", f"{p.name}: reply ended by {finish!r}, not after 128 tokens"
            samples[p.name]["tps"].append(128 / seconds)
        for p in paths:
            samples[p.name]["ratio"].append(samples[p.name]["tps"][-1] / samples[paths[0].name]["tps"][-1])
    for _ in range(2):
        for p in paths:
            rps = p.concurrent(8, max(200, n_latency))
            if rps is not None:
                samples[p.name]["rps"].append(rps)
    results = {}
    for name, s in samples.items():
        r = Result(p50=pct(s["lat"], 0.5), p90=pct(s["lat"], 0.9), ttft=statistics.median(s["ttft"]),
                   tps_min=min(s["tps"]), tps_med=statistics.median(s["tps"]), tps_max=max(s["tps"]),
                   tps_ratio=statistics.median(s["ratio"]))
        if s["rps"]:
            r["rps"] = statistics.median(s["rps"])
        results[name] = r
    return results


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError(url)


@contextmanager
def llama_server(model: Path, threads: int) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", "4096",
                             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--host", "127.0.0.1",
                             "--port", str(port), "--verbose", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def models_folder(root: Path, model: Path) -> Path:
    """`root`/models holding `model` (a hard link where the file system allows): what a bench node serves."""
    models = root / "models"
    models.mkdir()
    try:
        os.link(model, models / model.name)
    except OSError:  # another file system
        shutil.copyfile(model, models / model.name)
    return models


@contextmanager
def gateway_and_node(model: Path, threads: int, stream_interval_ms: float) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = models_folder(root, model)
        (root / "gw").mkdir()
        (root / "node").mkdir()
        gateway = Gateway(data_dir=root / "gw", port=free_port())
        gateway.start()
        agent = NodeAgent(gateway=gateway, models_dir=models, state_dir=root / "node",
                          extra_args=("--threads", str(threads), "--stream-interval-ms", str(stream_interval_ms)))
        agent.env["OPTIMAGPT_NODE_LOG_LEVEL"] = "WARNING"
        agent.start()
        try:
            agent.wait_for_model(MODEL_ID)
            yield gateway.url, gateway.create_api_key("bench")
        finally:
            agent.stop()
            gateway.stop()


def print_table(results: dict[str, Result], base_name: str, ratio_label: str) -> None:
    """The figures of every path as a Markdown table, each against `base_name`'s."""
    base = results[base_name]
    header = ("path", "1-tok p50 ms", "p90 ms", "added p50 ms", "TTFT ms", "tok/s min", "tok/s med", "tok/s max",
              f"tok/s {ratio_label}", "req/s @8")
    rows = []
    for name, r in results.items():
        rows.append((name, f"{r['p50']:.2f}", f"{r['p90']:.2f}", f"{r['p50'] - base['p50']:+.2f}",
                     f"{r['ttft']:.2f}", f"{r['tps_min']:.1f}", f"{r['tps_med']:.1f}", f"{r['tps_max']:.1f}",
                     f"{100 * r['tps_ratio']:.0f}%",
                     f"{r['rps']:.0f}" if "rps" in r else "-"))
    print_markdown(header, rows)


def print_markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A Markdown table, its columns padded to line up in a terminal too."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.add_argument("--stream-interval-ms", type=float, default=DEFAULT_STREAM_INTERVAL_MS,
                        help="the node's streaming interval (default: the node agent's default)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n, n_long = (50, 4) if args.quick else (300, 16)
    model = ensure_default_model(REPO / "models")

    print(f"model {model.name}, {args.threads} threads, {os.cpu_count()} cores, stream interval "
          f"{args.stream_interval_ms:g} ms; {n} latency samples, "
          f"{n_long} long replies per path, taken round-robin across the paths", flush=True)
    from bench.concurrency import llama_server as llama_cpp_server  # it imports this module

    with llama_server(model, args.threads) as server_url, llama_cpp_server(model, args.threads) as cpp_url, \
            gateway_and_node(model, args.threads, args.stream_interval_ms) as (gw_url, key):
        paths: list[BenchPath] = [
            InProcess(model, args.threads),
            Http("llama-cpp-python server", server_url, {}, "smollm2"),
            Http("llama-server --parallel 8", cpp_url, {}, "smollm2"),
            Worker(model, args.threads, args.stream_interval_ms),
            Http("gateway + node", gw_url, {"Authorization": f"Bearer {key}"}, MODEL_ID),
        ]
        try:
            results = run_interleaved(paths, n, n_long)
        finally:
            for p in paths:
                p.close()

    print_table(results, "in-process", "vs in-proc")
    server, gateway = results["llama-cpp-python server"], results["gateway + node"]
    cpp = results["llama-server --parallel 8"]
    print()
    print(f"gateway 1-token p50 {gateway['p50']:.2f} ms vs server alone {server['p50']:.2f} ms "
          f"({'PASS' if gateway['p50'] <= server['p50'] else 'FAIL'}; goal: no slower), "
          f"vs llama-server {cpp['p50']:.2f} ms")
    print(f"gateway tokens/s {100 * gateway['tps_ratio']:.1f}% of in-process, median of paired rounds "
          f"({'PASS' if gateway['tps_ratio'] >= 0.95 else 'FAIL'}; goal 95%)")
    print(f"gateway req/s @8 {gateway['rps']:.0f} vs server alone {server['rps']:.0f} "
          f"({'PASS' if gateway['rps'] >= server['rps'] else 'FAIL'}), vs llama-server {cpp['rps']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
