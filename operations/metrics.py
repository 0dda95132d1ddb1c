"""Prometheus metrics of the gateway, served at /metrics (operations/views.py).

Each gateway process counts its own requests (labelled `process`: Prometheus scrapes every process, as
README.md explains); figures about nodes and executors are read from the database at scrape time, so
they are the same whichever process is asked. Names follow vLLM's and llama.cpp's servers.

Request figures come from the finished request's record (operations/record.py): nothing is counted on
the way, so a request costs a handful of counter updates once, at its end. A model label is only ever a
model the router knows: a name nobody serves is counted under "" (anyone can send any name).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db.models import Count
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.routing import load
from gateway.routing import router as routing
from nodes.models import Executor, Node

from .config import tracing_on
from .record import PROCESS, RequestRecord, in_flight_by_model

disable_created_metrics()  # no `_created` series: Prometheus has its own timestamps
REGISTRY = CollectorRegistry()

# Buckets as vLLM's (seconds), so dashboards made for it read ours alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

REQUESTS = Counter("optimagpt_requests", "API requests, by model, operation and HTTP status",
                   ["process", "model", "operation", "status"], registry=REGISTRY)
LATENCY = Histogram("optimagpt_request_duration_seconds", "From a request's arrival to the end of its answer",
                    ["process", "model", "operation"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
TTFT = Histogram("optimagpt_time_to_first_token_seconds", "From a streamed request's arrival to its first token",
                 ["process", "model"], buckets=TTFT_BUCKETS, registry=REGISTRY)
QUEUE_WAIT = Histogram("optimagpt_queue_wait_seconds", "Time a request waited for a free slot (0 when none)",
                       ["process", "model"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
ITL = Histogram("optimagpt_inter_token_latency_seconds",
                "Between a streamed reply's chunks (a chunk joins the tokens made within the node's stream "
                "interval)", ["process", "model"], buckets=ITL_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter("optimagpt_prompt_tokens", "Prompt tokens processed", ["process", "model"],
                        registry=REGISTRY)
COMPLETION_TOKENS = Counter("optimagpt_generation_tokens", "Tokens generated", ["process", "model"],
                            registry=REGISTRY)
MCP_CALLS = Counter("optimagpt_mcp_tool_calls", "MCP tool calls the gateway ran, by server and tool",
                    ["process", "server", "tool"], registry=REGISTRY)
MCP_ERRORS = Counter("optimagpt_mcp_tool_errors", "MCP tool calls that failed or returned an error",
                     ["process", "server", "tool"], registry=REGISTRY)
ProcessCollector(registry=REGISTRY)  # CPU seconds, memory, open files of this process


def _model_label(record: RequestRecord) -> str:
    """The model as a label: only once routing took it (a name nobody serves could be anything)."""
    if not record.attempts or record.error_code == "model_not_found":
        return ""
    return record.model[:200]


_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(PROCESS, *labels)`, kept: labels() takes a lock and builds a key on every call."""
    key = (id(metric), *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(PROCESS, *labels)
    return child


def metrics_record(record: RequestRecord) -> None:
    """Count a finished request (a finisher of operations/record.py)."""
    model = _model_label(record)
    _child(REQUESTS, model, record.operation, str(record.status)).inc()
    _child(LATENCY, model, record.operation).observe((record.done - record.start) / 1e9)
    for tool in record.tools:
        _child(MCP_CALLS, tool.server, tool.tool).inc()
        if tool.error:
            _child(MCP_ERRORS, tool.server, tool.tool).inc()
    if not record.attempts:
        return
    waited = sum((a.granted - a.route_start) / 1e9 for a in record.attempts if a.granted and a.queued)
    _child(QUEUE_WAIT, model).observe(waited)
    if record.prompt_tokens:
        _child(PROMPT_TOKENS, model).inc(record.prompt_tokens)
    if record.completion_tokens:
        _child(COMPLETION_TOKENS, model).inc(record.completion_tokens)
    ttft = record.ttft_s()
    if ttft is not None:
        _child(TTFT, model).observe(ttft)
    if record.gaps:
        itl = _child(ITL, model)
        for gap in record.gaps:
            itl.observe(gap)


class LiveCollector(Collector):
    """What is true now: this process's requests in flight and queued per model; nodes, executors and node
    load from the database (the same from every process)."""

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("optimagpt_requests_in_flight", "Requests this process has on executors now",
                                      labels=["process", "model"])
        for model, count in sorted(in_flight_by_model().items()):
            in_flight.add_metric([PROCESS, model], count)
        yield in_flight
        queued = GaugeMetricFamily("optimagpt_requests_queued", "Requests waiting in this process for a free slot",
                                   labels=["process", "model"])
        for model in routing.queued_models():
            queued.add_metric([PROCESS, model], routing.queued(model))
        yield queued
        slots = GaugeMetricFamily("optimagpt_executor_slots_in_use",
                                  "Requests on each executor, as this process's router counts them",
                                  labels=["process", "executor"])
        for executor_pk, count in sorted(dict(load.mine).items()):
            slots.add_metric([PROCESS, str(executor_pk)], count)
        yield slots
        yield from _node_metrics()


def _node_metrics() -> Iterator[Metric]:
    cutoff = Node.live_cutoff()
    rows = list(Node.objects.values_list("name", "node_id", "connected", "activated", "last_seen", "metrics"))
    linked = GaugeMetricFamily("optimagpt_nodes_linked", "Nodes whose link is up and heard from")
    known = GaugeMetricFamily("optimagpt_nodes", "Nodes the gateway knows")
    known.add_metric([], len(rows))
    families: dict[str, GaugeMetricFamily] = {
        name: GaugeMetricFamily(f"optimagpt_node_{name}", text, labels=["node", "node_id"])
        for name, text in (("cpu_percent", "CPU use as the node last reported it (%)"),
                           ("ram_used_bytes", "RAM in use as last reported"),
                           ("ram_total_bytes", "RAM of the node"),
                           ("gpu_percent", "GPU use as last reported (%), the mean over its GPUs"),
                           ("vram_used_bytes", "VRAM in use as last reported, over all GPUs"),
                           ("vram_total_bytes", "VRAM over all GPUs"))}
    up = 0
    for name, node_id, connected, activated, last_seen, sample in rows:
        live = connected and activated and last_seen is not None and last_seen >= cutoff
        up += live
        if not live or not isinstance(sample, dict):
            continue
        labels = [name, str(node_id)]
        for field, key in (("cpu_percent", "cpu_percent"), ("ram_used_bytes", "ram_used"),
                           ("ram_total_bytes", "ram_total")):
            value = _number(sample.get(key))
            if value is not None:
                families[field].add_metric(labels, value)
        gpus = [g for g in sample.get("gpus") or () if isinstance(g, dict)]
        if gpus:
            util = [v for v in (_number(g.get("util_percent")) for g in gpus) if v is not None]
            if util:
                families["gpu_percent"].add_metric(labels, sum(util) / len(util))
            for field, key in (("vram_used_bytes", "vram_used"), ("vram_total_bytes", "vram_total")):
                values = [v for v in (_number(g.get(key)) for g in gpus) if v is not None]
                if values:
                    families[field].add_metric(labels, sum(values))
    linked.add_metric([], up)
    yield known
    yield linked
    yield from families.values()
    executors = GaugeMetricFamily("optimagpt_executors", "Executors by state", labels=["state"])
    counts = dict(Executor.objects.values_list("state").annotate(n=Count("pk")).values_list("state", "n"))
    for state in Executor.State.values:
        executors.add_metric([state], counts.get(state, 0))
    yield executors
    tracing = GaugeMetricFamily("optimagpt_tracing_enabled", "Whether System Tracing is on")
    tracing.add_metric([], 1.0 if tracing_on() else 0.0)
    yield tracing


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


REGISTRY.register(LiveCollector())
