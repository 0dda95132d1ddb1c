"""System Tracing: each API request as an OpenTelemetry trace, kept in a shared, bounded store for the
Diagnostics page, and sent to an OpenTelemetry collector too when OTEL_EXPORTER_OTLP_ENDPOINT is set.

Off by default, switched on on the Configuration page (operations/config.py: on until
OPTIMAGPT_TRACING_MAX_S has passed, off again at restart). While off, nothing here runs: no span is
made. While on, a finished request's record (operations/record.py) becomes its spans at once, with the
moments the request path noted (authentication, queue wait, route choice, node, first token,
generation, MCP tool calls, finish), made with the OpenTelemetry SDK's tracer at their real times.

The store: traces grouped by channel (LLM Inference, Embedding Inference, Tool Calls, API), newest first,
OPTIMAGPT_TRACES_KEPT per channel. With Redis, a Redis list per channel that every gateway process writes
to (a loop pushes what this process made, so the request path never waits on Redis); without, this
process's memory, which in the embedded default is the whole gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from .config import tracing_on
from .record import PROCESS, RequestRecord
from .shared import TIMEOUT_S, async_client, sync_client

log = logging.getLogger("optimagpt.operations.tracing")

LLM, EMBEDDING, TOOLS, API = "LLM Inference", "Embedding Inference", "Tool Calls", "API"
CHANNELS = (LLM, EMBEDDING, TOOLS, API)
_CHANNEL_OF = {"chat.completions": LLM, "completions": LLM, "responses": LLM, "embeddings": EMBEDDING}
PUSH_INTERVAL_S = 0.5


def channel_of(operation: str) -> str:
    return _CHANNEL_OF.get(operation, API)


# -- the store -----------------------------------------------------------------------------------
class TraceStore:
    """Finished traces by channel, newest first, at most OPTIMAGPT_TRACES_KEPT per channel."""

    def __init__(self) -> None:
        self._memory: dict[str, deque[str]] = {}
        self._unpushed: list[tuple[str, str]] = []

    @staticmethod
    def _key(channel: str) -> str:
        return f"optimagpt:traces:{channel}"

    def add(self, channel: str, document: dict[str, Any]) -> None:
        text = json.dumps(document, separators=(",", ":"))
        if settings.REDIS_URL:
            if len(self._unpushed) < 10 * settings.OPTIMAGPT_TRACES_KEPT:
                self._unpushed.append((channel, text))
            return
        self._memory.setdefault(channel, deque(maxlen=settings.OPTIMAGPT_TRACES_KEPT)).appendleft(text)

    async def push(self, client: Any) -> None:
        """Send what this process made to Redis (the loop below, with the client it keeps)."""
        if not self._unpushed:
            return
        pending, self._unpushed = self._unpushed, []
        async with client.pipeline(transaction=False) as pipe:
            for channel, text in pending:
                pipe.lpush(self._key(channel), text)
            for channel in {c for c, _ in pending}:
                pipe.ltrim(self._key(channel), 0, settings.OPTIMAGPT_TRACES_KEPT - 1)
                pipe.expire(self._key(channel), 7 * 86400)
            await pipe.execute()

    def read(self, channel: str) -> list[dict[str, Any]]:
        """The channel's traces, newest first (sync: a page's thread)."""
        if settings.REDIS_URL:
            texts: list[bytes] = sync_client().lrange(  # type: ignore[assignment] # redis types sync and async alike
                self._key(channel), 0, settings.OPTIMAGPT_TRACES_KEPT - 1)
            return [json.loads(t) for t in texts]
        # list() first: a page's thread reads while the event loop adds (a deque's iterator refuses that).
        return [json.loads(t) for t in list(self._memory.get(channel, ()))]

    def counts(self) -> dict[str, int]:
        if settings.REDIS_URL:
            client = sync_client()
            return {c: int(client.llen(self._key(c))) for c in CHANNELS}  # type: ignore[arg-type] # as above
        return {c: len(self._memory.get(c, ())) for c in CHANNELS}


store = TraceStore()


class StoreProcessor(SpanProcessor):
    """Gathers a trace's spans as they end; once its root ends, the whole trace goes to the store."""

    def __init__(self) -> None:
        self._open: dict[int, list[ReadableSpan]] = {}

    def on_end(self, span: ReadableSpan) -> None:
        context = span.get_span_context()
        if context is None:
            return
        spans = self._open.setdefault(context.trace_id, [])
        spans.append(span)
        if span.parent is None:
            del self._open[context.trace_id]
            document = _document(span, spans)
            store.add(document["channel"], document)
        elif len(self._open) > 10_000:  # roots that never ended: never expected, never kept for ever
            self._open.clear()

    def shutdown(self) -> None:
        self._open.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _ids(span: ReadableSpan) -> tuple[int, int]:
    context = span.get_span_context()
    return (context.trace_id, context.span_id) if context is not None else (0, 0)


def _document(root: ReadableSpan, spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    start = root.start_time or 0
    attributes = dict(root.attributes or {})
    return {
        "trace_id": f"{_ids(root)[0]:032x}",
        "channel": str(attributes.get("optimagpt.channel", API)),
        "name": root.name,
        "start": start / 1e9,
        "duration_ms": _ms((root.end_time or start) - start),
        "error": root.status.status_code == StatusCode.ERROR,
        "attributes": attributes,
        "spans": [{"name": s.name, "span_id": f"{_ids(s)[1]:016x}",
                   "parent_id": f"{s.parent.span_id:016x}" if s.parent is not None else None,
                   "offset_ms": _ms((s.start_time or start) - start),
                   "duration_ms": _ms((s.end_time or s.start_time or start) - (s.start_time or start)),
                   "attributes": dict(s.attributes or {})}
                  for s in _tree_order(spans)],
    }


def _tree_order(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """Each span followed by its children (in the order they began), as a timeline reads."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        children.setdefault(span.parent.span_id if span.parent is not None else None, []).append(span)
    ordered: list[ReadableSpan] = []

    def visit(parent: int | None) -> None:
        for span in sorted(children.get(parent, ()), key=lambda s: s.start_time or 0):
            ordered.append(span)
            visit(_ids(span)[1])

    visit(None)
    return ordered


_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    global _tracer
    if _tracer is None:
        provider = TracerProvider(resource=Resource.create({"service.name": "optimagpt-gateway",
                                                            "service.instance.id": PROCESS}))
        provider.add_span_processor(StoreProcessor())
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Its own thread sends batches: the request path never waits on the collector.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _tracer = provider.get_tracer("optimagpt.gateway")
    return _tracer


# -- a finished request as spans -----------------------------------------------------------------
def trace_record(record: RequestRecord) -> None:
    """Make the request's trace, while System Tracing is on (a finisher of operations/record.py)."""
    if not tracing_on():
        return
    try:
        _spans(record)
    except Exception:
        log.exception("could not trace a request")


def _spans(record: RequestRecord) -> None:
    tracer_ = tracer()
    channel = channel_of(record.operation)
    attributes: dict[str, Any] = {
        "optimagpt.channel": channel, "http.request.method": record.method, "url.path": record.path,
        "http.response.status_code": record.status, "optimagpt.operation": record.operation,
        "client.address": record.client, "optimagpt.process": PROCESS}
    if record.model:
        attributes["gen_ai.request.model"] = record.model[:200]
    if record.key_prefix:
        attributes["optimagpt.api_key_prefix"] = record.key_prefix
    if record.user_id is not None:
        attributes["enduser.id"] = str(record.user_id)
    if record.error_code:
        attributes["error.type"] = record.error_code
    if record.prompt_tokens or record.completion_tokens:
        attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
    root = tracer_.start_span(f"{record.method} {record.path}", kind=SpanKind.SERVER, start_time=record.start,
                              attributes=attributes)
    if record.status >= 500 or record.error_code:
        root.set_status(Status(StatusCode.ERROR, record.error_code or str(record.status)))
    under_root = trace.set_span_in_context(root)

    def span(name: str, start: int, end: int, context: Any = under_root, **attrs: Any) -> Any:
        if not start:
            return None
        child = tracer_.start_span(name, context=context, start_time=start,
                                   attributes={k: v for k, v in attrs.items() if v not in (None, "")})
        child.end(end_time=max(end or start, start))
        return child

    if record.auth_start:
        span("authentication", record.auth_start, record.auth_end)
    last = record.auth_end or record.start
    for number, attempt in enumerate(record.attempts, 1):
        granted = attempt.granted or attempt.sent or attempt.route_start
        if attempt.queued:
            span("queue wait", attempt.route_start, granted, attempt=number)
        span("route choice", granted if attempt.queued else attempt.route_start, granted, attempt=number,
             **{"optimagpt.executor": attempt.executor, "optimagpt.node": attempt.node_name,
                "optimagpt.routing": str(settings.OPTIMAGPT_ROUTING)})
        if attempt.sent:
            end = attempt.end or attempt.first or attempt.sent
            node_attributes: dict[str, str | int] = {"attempt": number}
            if attempt.node_name:
                node_attributes["optimagpt.node"] = attempt.node_name
            if attempt.executor:
                node_attributes["optimagpt.executor"] = attempt.executor
            node = tracer_.start_span("node", context=under_root, start_time=attempt.sent, attributes=node_attributes)
            under_node = trace.set_span_in_context(node)
            if attempt.first:
                span("first token", attempt.sent, attempt.first, under_node)
                if attempt.end:
                    span("generation", attempt.first, attempt.end, under_node)
            node.end(end_time=end)
            last = max(last, end)
    for tool in record.tools:
        span("mcp tool call", tool.start, tool.end, **{"mcp.server": tool.server, "mcp.tool": tool.tool,
                                                        "error": tool.error})
        last = max(last, tool.end)
    span("finish", last, record.done)
    root.end(end_time=record.done)
    request_trace = f"{root.get_span_context().trace_id:032x}"
    for tool in record.tools:  # each tool call in its channel too, pointing at the request it served
        call = tracer_.start_span(f"{tool.server} {tool.tool}", kind=SpanKind.CLIENT, start_time=tool.start,
                                  attributes={"optimagpt.channel": TOOLS, "mcp.server": tool.server,
                                              "mcp.tool": tool.tool, "error": tool.error,
                                              "optimagpt.request_trace_id": request_trace,
                                              "optimagpt.process": PROCESS})
        if tool.error:
            call.set_status(Status(StatusCode.ERROR, "tool error"))
        call.end(end_time=max(tool.end, tool.start))


async def tracing_forever(stop: asyncio.Event) -> None:
    """With Redis: push the traces this process made every PUSH_INTERVAL_S until `stop` is set."""
    if not settings.REDIS_URL:
        return
    client = async_client()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PUSH_INTERVAL_S)
            try:
                await asyncio.wait_for(store.push(client), 5 * TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - Redis away for a moment: those traces are lost, not the loop
                log.warning("could not store traces: %s", type(exc).__name__)
    finally:
        await client.aclose()
