"""Many users at once: eight concurrent chat completions against one alone, on three paths, in one run.

    .venv/bin/pip install -r requirements/bench.txt
    .venv/bin/python bench/concurrency.py [--threads 2] [--rounds 5] [--quick]

Each round asks every path, in turn, for one reply alone and then for eight at once (non-streamed chat
completions of at most 64 tokens, eight distinct prompts, temperature 0.7 over the whole distribution, a
seed each, end of text allowed: what real users send), so a drift in the machine's speed hits every path
alike. Figures: tokens per second of the one reply, total tokens per second of the eight (generated tokens
over wall time from the first request sent to the last answer), and their ratio; medians over the rounds.

Paths:
  gateway + node   client -> gateway -> node agent -> our worker (default executor settings)
  llama-server     llama.cpp's own server, `--parallel 8 -c 8192`, the same threads and model, built from
                   the llama.cpp source in llama-cpp-python's sdist with the CMake flags of optimagpt.sh
                   (kept in bench/.build/; the first run builds it, a few minutes on 2 cores)
  engine in-process  the worker's batching engine (node_agent/runtimes/batching.py) called in this process,
                   a thread per request as in the worker: the ceiling of our path, without HTTP or a pipe
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backbone import gateway_and_node, print_markdown, wait_http  # noqa: E402
from node_agent.default_model import ensure_default_model  # noqa: E402
from tests.processes import free_port  # noqa: E402

MODEL_ID = "smollm2-135m-instruct-q4_1"
MAX_TOKENS = 64
CONCURRENT = 8
TOPICS = ("the sea", "a mountain", "a city at night", "a robot", "the desert", "a library", "winter", "a garden",
          "a train journey")
BUILD = REPO / "bench" / ".build"


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}]


# Sampling from the whole distribution, as OpenAI's defaults (and so ours) do, said to both servers: left
# unsaid, llama-server cuts to top-k 40, top-p 0.95 and min-p 0.05 first, which samples a token in 0.17 ms
# where the whole distribution takes 0.45 ms (49,152 candidates, this model): not the same work.
SAMPLING = {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def body(i: int) -> dict[str, Any]:
    return {"messages": prompt(i), "max_tokens": MAX_TOKENS, **SAMPLING, "seed": 1000 + i}


# -- llama.cpp's own server, built from the same source ---------------------------------------
def cmake_args() -> list[str]:
    """The CMake flags optimagpt.sh builds llama-cpp-python with (CMAKE_ARGS overrides them, as there)."""
    default = re.search(r'CMAKE_ARGS:-"([^"]+)"', (REPO / "optimagpt.sh").read_text())
    assert default is not None
    return os.environ.get("CMAKE_ARGS", default.group(1)).split()


def llama_server_binary() -> Path:
    """llama-server built from the llama.cpp that llama-cpp-python's sdist vendors, at the installed version."""
    import llama_cpp

    folder = BUILD / f"llama.cpp-{llama_cpp.__version__}"
    binary = folder / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building llama-server from llama-cpp-python {llama_cpp.__version__}'s sdist (once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={llama_cpp.__version__}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder / "src", ignore_errors=True)
        shutil.copytree(source, folder / "src")
    subprocess.run([cmake, "-S", str(folder / "src"), "-B", str(folder / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
                    "-DLLAMA_BUILD_SERVER=ON", *cmake_args()], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(folder / "build"), "--config", "Release", "-j", str(os.cpu_count() or 2),
                    "--target", "llama-server", "llama-batched-bench"], check=True, stdout=subprocess.DEVNULL)
    return binary


@contextmanager
def llama_server(model: Path, threads: int) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(llama_server_binary()), "-m", str(model), "--parallel", str(CONCURRENT),
                             "-c", str(1024 * CONCURRENT), "-t", str(threads), "-tb", str(threads),
                             "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120)
        deadline = time.monotonic() + 120
        while httpx.get(f"http://127.0.0.1:{port}/health").status_code != 200:  # 503 while loading
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


# -- the worker's batching engine, in this process ---------------------------------------------
class InProcess:
    """node_agent.runtimes.batching.Engine without HTTP or a pipe: the ceiling of the worker's own path."""

    def __init__(self, model: Path, threads: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from node_agent.runtimes.batching import Engine

        self.llm = Llama(model_path=str(model), n_ctx=256, n_threads=threads, verbose=False)
        self.engine = Engine(self.llm, n_ctx=1024, parallel=CONCURRENT, threads=threads)
        self.formatter = Jinja2ChatFormatter(template=self.llm.metadata["tokenizer.chat_template"],
                                             eos_token=self.llm.detokenize([self.llm.token_eos()]).decode(),
                                             bos_token=self.llm.detokenize([self.llm.token_bos()]).decode())

    def one(self, i: int) -> int:
        from node_agent.runtimes.batching import Generation

        rendered = self.formatter(messages=prompt(i))
        tokens = self.llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
        params = {"max_tokens": MAX_TOKENS, **SAMPLING, "repeat_penalty": 1.0, "frequency_penalty": 0.0,
                  "presence_penalty": 0.0, "stop": [], "seed": 1000 + i, "logit_bias": None, "grammar": None}
        gen = Generation(str(i), tokens, params, cancelled=lambda: False)
        for _ in self.engine.generate(gen):
            pass
        return gen.completion_tokens

    def run(self, seqs: list[int]) -> int:
        return threaded(self.one, seqs)


# -- measuring -----------------------------------------------------------------------------------
def threaded(one: Callable[[int], int], seqs: list[int]) -> int:
    """Run `one` for every prompt of `seqs` at once, a thread each; the tokens generated in all."""
    if len(seqs) == 1:
        return one(seqs[0])
    counts = [0] * len(seqs)

    def worker(k: int) -> None:
        counts[k] = one(seqs[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def http_path(url: str, headers: dict[str, str], model: str) -> Callable[[list[int]], int]:
    client = httpx.Client(base_url=url, headers=headers, timeout=300,
                          limits=httpx.Limits(max_connections=CONCURRENT * 2))

    def one(i: int) -> int:
        response = client.post("/v1/chat/completions", json={**body(i), "model": model})
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    return lambda seqs: threaded(one, seqs)


def timed(run: Callable[[list[int]], int], seqs: list[int]) -> float:
    start = time.perf_counter()
    tokens = run(seqs)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two rounds, for a smoke run")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    model = ensure_default_model(REPO / "models")
    llama_server_binary()
    print(f"model {model.name}, {args.threads} threads, {os.cpu_count()} cores; {rounds} rounds of one reply alone "
          f"and {CONCURRENT} at once per path, {MAX_TOKENS} tokens at most, temperature 0.7", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    with llama_server(model, args.threads) as server_url, \
            gateway_and_node(model, args.threads, 0) as (gw_url, key):
        paths = {"gateway + node": http_path(gw_url, {"Authorization": f"Bearer {key}"}, MODEL_ID),
                 "llama-server --parallel 8": http_path(server_url, {}, "smollm2"),
                 "engine in-process": InProcess(model, args.threads).run}
        for run in paths.values():  # warm up: first requests pay for caches and page faults
            run([0])
        for r in range(rounds):
            for name, run in paths.items():
                alone = timed(run, [r])
                together = timed(run, list(range(r, r + CONCURRENT)))
                results.setdefault(name, {"alone": [], "together": []})
                results[name]["alone"].append(alone)
                results[name]["together"].append(together)
            print(f"round {r + 1}: " + ", ".join(f"{n} {results[n]['together'][-1]:.0f}" for n in paths), flush=True)

    header = ("path", "1 alone tok/s", f"{CONCURRENT} at once tok/s", "ratio", "vs llama-server @8")
    server = statistics.median(results["llama-server --parallel 8"]["together"])
    rows = []
    for name, r in results.items():
        alone, together = statistics.median(r["alone"]), statistics.median(r["together"])
        rows.append((name, f"{alone:.1f}", f"{together:.1f}", f"{together / alone:.2f}x",
                     f"{100 * together / server:.0f}%"))
    print_markdown(header, rows)
    gateway = results["gateway + node"]
    ratio = statistics.median(gateway["together"]) / statistics.median(gateway["alone"])
    print(f"\ngateway: {CONCURRENT} at once {ratio:.2f}x one alone ({'PASS' if ratio >= 1.6 else 'FAIL'}; goal 1.6x); "
          f"{100 * statistics.median(gateway['together']) / server:.0f}% of llama-server --parallel 8 "
          f"({'PASS' if statistics.median(gateway['together']) >= 0.9 * server else 'FAIL'}; goal 90%, match it)")


if __name__ == "__main__":
    main()
