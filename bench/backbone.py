"""Backbone benchmark: the same requests on four paths, in one run, on this machine.

    .venv/bin/pip install -r requirements/bench.txt
    .venv/bin/python bench/backbone.py [--threads 2] [--quick]

Paths, each measured alone (the others stopped) so they do not share the CPU:
  in-process   llama_cpp.Llama in this process (the physical limit)
  server       llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`), the baseline
  worker       our inference process, straight over its pipe (node_agent.runtimes.llama_cpp)
  gateway      client -> daphne gateway -> channel layer -> node link -> node agent -> worker

Figures: latency of a 1-token chat request (p50, p90, and p50 added over in-process), time to
first token of a streamed reply, tokens/s of a 128-token reply (end of text suppressed so every
run makes 128 tokens; min/median/max of several runs, to show a bimodal path), and requests/s
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node_agent.default_model import ensure_default_model  # noqa: E402
from node_agent.runtimes.llama_cpp import LlamaCppProcess, ProcessConfig  # noqa: E402
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


# -- measurement loops, shared by every path ---------------------------------------------
def measure(one: Callable[[], None], ttft: Callable[[], float], long: Callable[[], tuple[int, float]],
            concurrent: Callable[[int, int], float] | None, n_latency: int, n_long: int) -> Result:
    for _ in range(10):
        one()  # warm up: prompt cache, connections, JIT-free but page-cache warm
    latencies = []
    for _ in range(n_latency):
        t = time.perf_counter()
        one()
        latencies.append((time.perf_counter() - t) * 1000)
    ttfts = [ttft() * 1000 for _ in range(max(5, n_latency // 10))]
    rates = []
    for _ in range(n_long):
        tokens, seconds = long()
        assert tokens == 128, f"expected 128 tokens, got {tokens}"
        rates.append(tokens / seconds)
    r = Result(p50=pct(latencies, 0.5), p90=pct(latencies, 0.9), ttft=statistics.median(ttfts),
               tps_min=min(rates), tps_med=statistics.median(rates), tps_max=max(rates))
    if concurrent is not None:
        r["rps"] = concurrent(8, max(200, n_latency))
    return r


# -- path: in-process ---------------------------------------------------------------------
def bench_in_process(model: Path, threads: int, n: int, n_long: int) -> Result:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)

    def one() -> None:
        llm.create_chat_completion(**ONE_TOKEN)

    def ttft() -> float:
        # Read the whole reply, as the other paths do: a reply left half-read keeps
        # the prompt's logits cached and flatters the next request.
        elapsed = None
        t = time.perf_counter()
        for chunk in llm.create_chat_completion(**TTFT, stream=True):
            if elapsed is None and chunk["choices"][0]["delta"].get("content"):
                elapsed = time.perf_counter() - t
        assert elapsed is not None, "no token"
        return elapsed

    def long() -> tuple[int, float]:
        body = {**LONG, "logit_bias": {EOS_TOKEN: -100}}
        t = time.perf_counter()
        reply = llm.create_chat_completion(**body)
        return reply["usage"]["completion_tokens"], time.perf_counter() - t

    result = measure(one, ttft, long, None, n, n_long)
    del llm
    return result


# -- path: HTTP (llama-cpp-python's server, and our gateway) -----------------------------
def bench_http(base: str, headers: dict[str, str], model: str, n: int, n_long: int) -> Result:
    client = httpx.Client(base_url=base, headers=headers, timeout=120)

    def post(body: dict[str, Any]) -> dict[str, Any]:
        response = client.post("/v1/chat/completions", json={"model": model, **body})
        response.raise_for_status()
        return response.json()

    def one() -> None:
        post(ONE_TOKEN)

    def ttft() -> float:
        t = time.perf_counter()
        elapsed = None
        with client.stream("POST", "/v1/chat/completions", json={"model": model, "stream": True, **TTFT}) as r:
            for line in r.iter_lines():  # read to the end, so the connection is reused
                if elapsed is None and line.startswith("data: {") and \
                        json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    elapsed = time.perf_counter() - t
        assert elapsed is not None, "no token"
        return elapsed

    def long() -> tuple[int, float]:
        t = time.perf_counter()
        reply = post(LONG)
        return reply["usage"]["completion_tokens"], time.perf_counter() - t

    def concurrent(clients: int, total: int) -> float:
        async def run() -> float:
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120,
                                         limits=httpx.Limits(max_connections=clients)) as aclient:
                remaining = total

                async def worker() -> None:
                    nonlocal remaining
                    while remaining > 0:
                        remaining -= 1
                        response = await aclient.post("/v1/chat/completions", json={"model": model, **ONE_TOKEN})
                        response.raise_for_status()

                await asyncio.gather(*(worker() for _ in range(clients)))  # warm the connections
                remaining = total
                t = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(clients)))
                return total / (time.perf_counter() - t)

        return asyncio.run(run())

    try:
        return measure(one, ttft, long, concurrent, n, n_long)
    finally:
        client.close()


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


@contextmanager
def gateway_and_node(model: Path, threads: int) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        models.mkdir()
        try:
            os.link(model, models / model.name)
        except OSError:  # another file system
            shutil.copyfile(model, models / model.name)
        (root / "gw").mkdir()
        (root / "node").mkdir()
        gateway = Gateway(data_dir=root / "gw", port=free_port())
        gateway.start()
        agent = NodeAgent(gateway=gateway, models_dir=models, state_dir=root / "node",
                          extra_args=("--threads", str(threads)))
        agent.env["OPTIMAGPT_NODE_LOG_LEVEL"] = "WARNING"
        agent.start()
        try:
            agent.wait_for_model(MODEL_ID)
            yield gateway.url, gateway.create_api_key("bench")
        finally:
            agent.stop()
            gateway.stop()


# -- path: our worker, straight over its pipe ---------------------------------------------
def bench_worker(model: Path, threads: int, n: int, n_long: int) -> Result:
    async def run() -> Result:
        process = LlamaCppProcess(ProcessConfig(model_path=str(model), n_ctx=4096, threads=threads, n_gpu_layers=0),
                                  on_state=lambda: None)
        process.start()
        while process.state != "online":
            await asyncio.sleep(0.05)
        counter = iter(range(10**9))

        async def call(body: dict[str, Any], stream: bool, first_token: bool = False) -> tuple[dict[str, Any], float]:
            done = asyncio.get_running_loop().create_future()
            t = time.perf_counter()
            first: list[float] = []

            async def sink(raw: str, event: dict[str, Any]) -> None:
                if event["type"] == "delta" and not first:
                    first.append(time.perf_counter() - t)
                if event["type"] in ("end", "error") and not done.done():
                    done.set_result(event)

            process.submit({"op": "chat", "id": str(next(counter)), "stream": stream, "body": body}, sink)
            event = await done
            return event, (first[0] if first_token else time.perf_counter() - t)

        loop_results: dict[str, Any] = {}
        for _ in range(10):
            await call(ONE_TOKEN, False)
        latencies = [(await call(ONE_TOKEN, False))[1] * 1000 for _ in range(n)]
        ttfts = [(await call(TTFT, True, first_token=True))[1] * 1000 for _ in range(max(5, n // 10))]
        rates = []
        for _ in range(n_long):
            event, seconds = await call(LONG, False)
            assert event["usage"]["completion_tokens"] == 128
            rates.append(128 / seconds)
        total = max(200, n)
        t = time.perf_counter()
        await asyncio.gather(*(call(ONE_TOKEN, False) for _ in range(total)))
        loop_results["rps"] = total / (time.perf_counter() - t)
        await process.stop()
        return Result(p50=pct(latencies, 0.5), p90=pct(latencies, 0.9), ttft=statistics.median(ttfts),
                      tps_min=min(rates), tps_med=statistics.median(rates), tps_max=max(rates), **loop_results)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    n, n_long = (50, 3) if args.quick else (300, 7)
    model = ensure_default_model(REPO / "models")

    results: dict[str, Result] = {}
    print(f"model {model.name}, {args.threads} threads, {os.cpu_count()} cores; {n} latency samples, "
          f"{n_long} long replies per path", flush=True)
    results["in-process"] = bench_in_process(model, args.threads, n, n_long)
    print("in-process done", flush=True)
    with llama_server(model, args.threads) as base:
        results["llama-cpp-python server"] = bench_http(base, {}, "smollm2", n, n_long)
    print("server done", flush=True)
    results["worker (pipe)"] = bench_worker(model, args.threads, n, n_long)
    print("worker done", flush=True)
    with gateway_and_node(model, args.threads) as (base, key):
        results["gateway + node"] = bench_http(base, {"Authorization": f"Bearer {key}"}, MODEL_ID, n, n_long)
    print("gateway done\n", flush=True)

    base = results["in-process"]
    header = ("path", "1-tok p50 ms", "p90 ms", "added p50 ms", "TTFT ms", "tok/s min", "tok/s med", "tok/s max",
              "% of in-proc", "req/s @8")
    rows = []
    for name, r in results.items():
        rows.append((name, f"{r['p50']:.2f}", f"{r['p90']:.2f}", f"{r['p50'] - base['p50']:+.2f}",
                     f"{r['ttft']:.2f}", f"{r['tps_min']:.1f}", f"{r['tps_med']:.1f}", f"{r['tps_max']:.1f}",
                     f"{100 * r['tps_med'] / base['tps_med']:.0f}%",
                     f"{r['rps']:.0f}" if "rps" in r else "-"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    server, gateway = results["llama-cpp-python server"], results["gateway + node"]
    print()
    print(f"gateway 1-token p50 {gateway['p50']:.2f} ms vs server alone {server['p50']:.2f} ms "
          f"({'PASS' if gateway['p50'] <= server['p50'] else 'FAIL'}; goal 5 ms)")
    print(f"gateway tokens/s {100 * gateway['tps_med'] / base['tps_med']:.1f}% of in-process "
          f"({'PASS' if gateway['tps_med'] >= 0.95 * base['tps_med'] else 'FAIL'}; goal 95%)")
    print(f"gateway req/s @8 {gateway['rps']:.0f} vs server alone {server['rps']:.0f} "
          f"({'PASS' if gateway['rps'] >= server['rps'] else 'FAIL'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
