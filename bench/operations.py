"""Operations benchmark: what metrics, the request log and System Tracing cost, and a scrape of /metrics.

    .venv/bin/python bench/operations.py [--rounds 7] [--requests 3000] [--concurrency 32] [--nodes 500]

Four gateways with a simulated node each (it answers at once, so what remains is the gateway's own work):
`off` and `off-2` (OPTIMAGPT_METRICS=false, OPTIMAGPT_REQUEST_LOG=false; the second is the control: what two
identical gateways differ by on this machine), `on` (both on, the default) and `tracing` (both on, and
System Tracing switched on). Each round sends --requests 1-token chat completions from --concurrency clients
to each gateway in turn (the order rotates), so a drift of the machine's speed hits all alike; the table
gives each round's requests/s and the median of the per-round ratios.

Then the instruments' own cost, in one gateway process's code with its database: a finished request's
record through the metrics, the request log's buffer and its batched write, and through tracing, in
microseconds a request, against the time a request takes at the `on` gateway's measured rate.

Then a gateway with --nodes simulated nodes, each reporting its load every 2 s: the time to scrape /metrics
(node gauges read from the database), against the same scrape with one node.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import METRICS_TOKEN, Gateway, SimulatedNodes, free_port  # noqa: E402

BODY = {"model": "plain", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
PASSWORD = "a-long-bench-password-1"


def gateway_with_node(base: Path, name: str, **env: str) -> tuple[Gateway, SimulatedNodes, str]:
    (base / name).mkdir()
    gateway = Gateway(data_dir=base / name, port=free_port(), LOG_LEVEL="WARNING", **env)
    gateway.start()
    node = SimulatedNodes(gateway=gateway, log_dir=base / name, model="plain", slots=64, prefix=name)
    node.start()
    return gateway, node, gateway.create_api_key(name)


async def requests_per_s(url: str, key: str, total: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=60) as client:
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                response = await client.post("/v1/chat/completions", json=BODY)
                assert response.status_code == 200, response.text

        for _ in range(concurrency):  # warm the connections
            await client.post("/v1/chat/completions", json=BODY)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - started)


def scrape_ms(gateway: Gateway, times: int) -> list[float]:
    values = []
    with gateway.http() as http:
        for _ in range(times):
            started = time.perf_counter()
            response = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            values.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
    return values


def switch_tracing_on(gateway: Gateway) -> None:
    browser = gateway.admin_browser("bench", PASSWORD)
    response = browser.post("/manage/settings/", data={"action": "tracing", "tracing": "on",
                                                       "csrfmiddlewaretoken": browser.cookies["csrftoken"]})
    assert response.status_code == 302, response.text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--nodes", type=int, default=500)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-operations-"))
    running: list[Gateway | SimulatedNodes] = []
    try:
        sides = {}
        off = {"OPTIMAGPT_METRICS": "false", "OPTIMAGPT_REQUEST_LOG": "false"}
        for name, env in (("off", off), ("off-2", off), ("on", {}), ("tracing", {"OPTIMAGPT_TRACING_MAX_S": "86400"})):
            gateway, node, key = gateway_with_node(base, name, **env)
            running += [node, gateway]
            sides[name] = (gateway, key)
        switch_tracing_on(sides["tracing"][0])

        rates: dict[str, list[float]] = {name: [] for name in sides}
        cpu_us: dict[str, list[float]] = {name: [] for name in sides}  # the gateway process's CPU per request
        order = list(sides)
        for number in range(args.rounds):
            for name in order[number % len(order):] + order[:number % len(order)]:
                gateway, key = sides[name]
                process = psutil.Process(gateway.proc.pid)
                before = sum(process.cpu_times()[:2])
                rates[name].append(asyncio.run(requests_per_s(gateway.url, key, args.requests, args.concurrency)))
                cpu_us[name].append((sum(process.cpu_times()[:2]) - before) / (args.requests + args.concurrency) * 1e6)
            print(f"round {number + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f}/s {cpu_us[n][-1]:.0f} µs CPU"
                                                      for n in sides), flush=True)
        on_off = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
        control = [b / a for a, b in zip(rates["off"], rates["off-2"], strict=True)]
        tracing_on = [t / on for t, on in zip(rates["tracing"], rates["on"], strict=True)]
        logged = int(sides["on"][0].manage("shell", "-c", "from operations.models import RequestLogEntry as R; "
                                           "print(R.objects.count())").strip().splitlines()[-1])

        print()
        print(f"1-token chat completions, {args.requests} a round from {args.concurrency} clients, {args.rounds} "
              "rounds (interleaved)")
        print()
        print("| gateway | requests/s (median of rounds) | each round | gateway CPU µs a request (median) |")
        print("| --- | ---: | --- | ---: |")
        for name, label in (("off", "metrics and request log off"), ("off-2", "the same, a second gateway (control)"),
                            ("on", "metrics and request log on (default)"), ("tracing", "and System Tracing on")):
            print(f"| {label} | {statistics.median(rates[name]):.0f} | "
                  f"{', '.join(f'{r:.0f}' for r in rates[name])} | {statistics.median(cpu_us[name]):.0f} |")
        print()
        print(f"on / off, median of the per-round ratios: {statistics.median(on_off):.4f} "
              f"({(statistics.median(on_off) - 1) * 100:+.2f}%; rounds {', '.join(f'{r:.3f}' for r in on_off)})")
        for a, b, what in (("on", "off", "on / off"), ("off-2", "off", "control, off-2 / off"),
                           ("tracing", "on", "tracing on / tracing off")):
            ratios = [x / y for x, y in zip(cpu_us[a], cpu_us[b], strict=True)]
            print(f"gateway CPU a request, {what}: {statistics.median(ratios):.4f} "
                  f"({(statistics.median(ratios) - 1) * 100:+.2f}%)")
        print(f"control, off-2 / off: {statistics.median(control):.4f} "
              f"({(statistics.median(control) - 1) * 100:+.2f}%; rounds {', '.join(f'{r:.3f}' for r in control)})")
        print(f"tracing on / tracing off (the `on` gateway): {statistics.median(tracing_on):.4f} "
              f"({(statistics.median(tracing_on) - 1) * 100:+.2f}%; rounds "
              f"{', '.join(f'{r:.3f}' for r in tracing_on)})")
        print(f"request log entries written by the `on` gateway: {logged}")

        request_us = 1e6 / statistics.median(rates["on"])
        print()
        print(sides["on"][0].manage("shell", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                                    f"from bench.operations import instrument_cost; instrument_cost({request_us!r})"))
        one_node = scrape_ms(sides["on"][0], 30)
        for item in running:
            item.stop()
        running.clear()
        (base / "many").mkdir()
        many = Gateway(data_dir=base / "many", port=free_port(), LOG_LEVEL="WARNING")
        many.start()
        running.append(many)
        nodes = SimulatedNodes(gateway=many, log_dir=base / "many", count=args.nodes, prefix="many",
                               metrics_interval_s=2.0)
        nodes.start(timeout_s=180)
        running.insert(0, nodes)
        time.sleep(5)  # every node has reported its load at least twice
        scraped = scrape_ms(many, 30)
        with many.http() as http:
            text = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        series = sum(1 for line in text.splitlines() if line.startswith("optimagpt_node_cpu_percent{"))
        print()
        print("| /metrics scrape | median ms | p90 ms | scrapes |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| 1 node (baseline) | {statistics.median(one_node):.1f} | "
              f"{sorted(one_node)[int(0.9 * len(one_node))]:.1f} | {len(one_node)} |")
        print(f"| {args.nodes} simulated nodes ({series} with a CPU figure, {len(text) // 1024} KiB) | "
              f"{statistics.median(scraped):.1f} | {sorted(scraped)[int(0.9 * len(scraped))]:.1f} | {len(scraped)} |")
    finally:
        for item in running:
            item.stop()


def instrument_cost(request_us: float, count: int = 20000) -> None:
    """What the instruments take per request, in this process (run inside the `on` gateway's settings)."""
    from operations import requestlog, tracing
    from operations.config import tracing_off_at_start, tracing_switch
    from operations.metrics import metrics_record
    from operations.record import Attempt, RequestRecord

    def record(number: int) -> RequestRecord:
        now = time.time_ns()
        return RequestRecord(method="POST", path="/v1/chat/completions", client="127.0.0.1", start=now - 3_000_000,
                             operation="chat.completions", model="plain", key_prefix="sk-optima-abcdef",
                             auth_start=now - 2_900_000, auth_end=now - 2_800_000, status=200, done=now,
                             prompt_tokens=9, completion_tokens=1,
                             attempts=[Attempt(route_start=now - 2_700_000, granted=now - 2_600_000,
                                               node_name="sim-0000", executor="plain.gguf", sent=now - 2_500_000,
                                               first=now - 1_000_000, end=now - 900_000)])

    records = [record(i) for i in range(count)]
    timings = {}
    started = time.perf_counter()
    for r in records:
        metrics_record(r)
    timings["metrics"] = time.perf_counter() - started
    started = time.perf_counter()
    for r in records:
        requestlog.request_log_add(r)
    taken = requestlog._take()
    for i in range(0, len(taken), 250):  # as the loop writes them: about a second's worth at a time
        requestlog.request_log_write(taken[i:i + 250])
    timings["request log (buffer and batched write)"] = time.perf_counter() - started
    tracing_switch(username="bench", on=True)
    from operations.config import settings_apply

    settings_apply()
    started = time.perf_counter()
    for r in records:
        tracing.trace_record(r)
    timings["System Tracing (spans and store)"] = time.perf_counter() - started
    tracing_off_at_start()
    print(f"| instrument | µs a request | share of a request ({request_us:.0f} µs at the `on` gateway's rate) |")
    print("| --- | ---: | ---: |")
    for name, seconds in timings.items():
        per = seconds / count * 1e6
        print(f"| {name} | {per:.1f} | {per / request_us * 100:.2f}% |")


if __name__ == "__main__":
    main()
