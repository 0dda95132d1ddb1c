"""The gateway's own application under daphne (what it runs on) and under uvicorn, side by side, in one run.

    .venv/bin/pip install -r requirements/bench.txt
    .venv/bin/python bench/servers.py [--seconds 8] [--rounds 3] [--latency 300]

Why: one gateway process answers about a third of what a bare ASGI app answers under daphne
(bench/routing.py), and with the Django and django-ninja work cut down, py-spy puts most of what is
left in the server stack: Twisted, daphne and autobahn (the node link) together are about a third of
the gateway's CPU under load and over half of it between sequential requests. This measures what
another server would buy, with the same application and everything on the request path switched on
(API-key checks, limits, usage, the request log, metrics), before anyone moves the gateway:

1. Requests/s of routing.py's load (1-token chat completions over kept-alive connections to 4
   instant simulated nodes) through the gateway on each server, and a bare ASGI app on each (what
   each server alone allows on this machine); rounds interleaved.
2. p50 latency of sequential 1-token chat requests through the gateway on each server to a real
   node agent with SmolLM2, against llama-cpp-python's own server; rounds interleaved.

uvicorn runs with httptools (HTTP), its websockets-sansio protocol (the node link) and uvloop. The
launcher here (`serve`) is a measuring device, not a way to run the product: it starts only the
background loops that every request feeds (the request log's writer, the request counts), and none
of what optimagpt/server.py adds to daphne (HTTPS, slow-request time-outs, dialing nodes, shutdown
hand-over).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backbone import MODEL_ID, Http, llama_server, models_folder, print_markdown, wait_http  # noqa: E402
from bench.routing import _wait_model, bare_app_on, load  # noqa: E402
from node_agent.default_model import ensure_default_model  # noqa: E402
from tests.processes import Gateway, NodeAgent, SimulatedNodes, free_port  # noqa: E402

SERVERS = ("daphne", "uvicorn")


def serve_on_uvicorn(port: int) -> None:
    """The gateway's application under uvicorn on 127.0.0.1:`port`, with the loops every request feeds."""
    import django
    import uvicorn
    import uvloop

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "optimagpt.settings")
    django.setup()
    from optimagpt import server

    server._forget_links_of_a_previous_run()  # as optimagpt.server does before it serves
    server._apply_stored_settings()

    async def serve() -> None:
        from gateway.stats import publish_forever
        from nodes.outbound import OWNER
        from operations.requestlog import request_log_forever
        from optimagpt.asgi import application

        stopping = asyncio.Event()
        loops = [asyncio.ensure_future(request_log_forever(stopping)),
                 asyncio.ensure_future(publish_forever(owner=OWNER, stop=stopping))]
        config = uvicorn.Config(application, host="127.0.0.1", port=port, loop="none", http="httptools",
                                ws="websockets-sansio", lifespan="off", log_level="warning", access_log=False)
        try:
            await uvicorn.Server(config).serve()
        finally:
            stopping.set()
            await asyncio.wait(loops, timeout=10)

    uvloop.run(serve())


@contextmanager
def gateway_on(server: str, root: Path) -> Iterator[Gateway]:
    """A gateway of its own (database and all) served by `server`."""
    gateway = Gateway(data_dir=root / f"gateway-{server}", port=free_port())
    gateway.data_dir.mkdir()
    if server == "daphne":
        gateway.start()
    else:
        gateway.manage("migrate", "--verbosity", "0")
        # As a module from the repository (bench/ first on the path would put bench/mcp.py in place of the SDK).
        gateway._spawn([sys.executable, "-m", "bench.servers", "serve", str(gateway.port)], gateway.env)
        wait_http(gateway.url + "/healthz")
    try:
        yield gateway
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8, help="seconds of load per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--latency", type=int, default=300, help="sequential 1-token requests per path")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    model = ensure_default_model(REPO / "models")

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        bare = {server: stack.enter_context(bare_app_on(server, root)) for server in SERVERS}
        gateways = {server: stack.enter_context(gateway_on(server, root)) for server in SERVERS}
        keys = {server: gateway.create_api_key("bench") for server, gateway in gateways.items()}
        for server, gateway in gateways.items():
            sims = SimulatedNodes(gateway=gateway, log_dir=root, count=4, slots=16, metrics_interval_s=3600,
                                  prefix=f"sim-{server}")
            sims.start()
            stack.callback(sims.stop)
            _wait_model(gateway, keys[server])

        rps: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            for server in SERVERS:
                for name, url in ((f"bare ASGI app on {server}", bare[server]),
                                  (f"gateway on {server} -> 4 instant simulated nodes", gateways[server].url)):
                    rps.setdefault(name, []).append(load(url, keys[server], args.concurrency, args.seconds)["rps"])
            print(f"round {round_ + 1}: " + ", ".join(f"{n.split(' ->')[0]} {v[-1]:.0f}" for n, v in rps.items()),
                  file=sys.stderr, flush=True)

        models = models_folder(root, model)
        paths = [Http("llama-cpp-python server", stack.enter_context(llama_server(model, args.threads)), {}, "smollm2")]
        for server, gateway in gateways.items():
            (root / f"node-{server}").mkdir()
            agent = NodeAgent(gateway=gateway, models_dir=models, state_dir=root / f"node-{server}",
                              name=f"node-{server}", extra_args=("--threads", str(args.threads)))
            agent.env["OPTIMAGPT_NODE_LOG_LEVEL"] = "WARNING"
            agent.start()
            stack.callback(agent.stop)
            agent.wait_for_model(MODEL_ID)
            paths.append(Http(f"gateway on {server} + node", gateway.url,
                              {"Authorization": f"Bearer {keys[server]}"}, MODEL_ID))
        latencies: dict[str, list[float]] = {p.name: [] for p in paths}
        for p in paths:
            for _ in range(20):
                p.one()  # warm: connections, the prompt's cache
        for _ in range(args.latency // 10):
            for p in paths:
                for _ in range(10):
                    started = time.perf_counter()
                    p.one()
                    latencies[p.name].append((time.perf_counter() - started) * 1000)
        for p in paths:
            p.close()

    print(f"\n{os.cpu_count()} cores; load: {args.concurrency} connections, {args.seconds:g} s, {args.rounds} rounds "
          f"(median shown); latency: {args.latency} sequential 1-token chat requests per path\n")
    baseline = statistics.median(rps["bare ASGI app on daphne"])
    print_markdown(("path", "req/s", "vs bare app on daphne"),
                   [(name, f"{statistics.median(v):.0f}", f"{100 * statistics.median(v) / baseline:.1f}%")
                    for name, v in rps.items()])
    print()
    server_p50 = statistics.median(latencies["llama-cpp-python server"])
    print_markdown(("path", "1-token p50 ms", "vs llama-cpp-python server"),
                   [(name, f"{statistics.median(v):.2f}", f"{statistics.median(v) - server_p50:+.2f} ms")
                    for name, v in latencies.items()])


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve_on_uvicorn(int(sys.argv[2]))
    else:
        main()
