"""What one API request did, noted as it goes: read at its end by the metrics, the request log and tracing.

The lean API handler (optimagpt/asgi.py) opens a record per request and keeps it in a context variable;
authentication, routing, the node call and MCP tool calls note their moments on it (a few attribute
writes each, in the request's own task: no lock, no thread hop). `request_finished` hands the closed
record to each instrument that is on. Times are `time.time_ns()`, so spans can be made from them afterwards.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# Which gateway process this is: a label on its metrics, traces and log lines.
PROCESS = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class Attempt:
    """One try at an executor: routed (maybe after a wait in the queue), sent, answered."""

    route_start: int
    granted: int = 0
    queued: bool = False
    node_pk: int | None = None
    node_name: str = ""
    executor: str = ""
    sha256: str = ""
    sent: int = 0
    first: int = 0
    end: int = 0


@dataclass(slots=True)
class ToolCall:
    server: str
    tool: str
    start: int
    end: int = 0
    error: bool = False


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    client: str
    start: int = field(default_factory=time.time_ns)
    operation: str = ""
    model: str = ""
    stream: bool = False
    key_prefix: str = ""
    user_id: int | None = None
    auth_start: int = 0
    auth_end: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    tools: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: int = 0  # the first streamed event of the reply, over all attempts and rounds
    status: int = 0
    error_code: str = ""
    done: int = 0
    last_delta: int = 0  # when the last streamed event came, for the gaps between them
    gaps: list[float] = field(default_factory=list)  # seconds between streamed events (inter-token latency)

    @property
    def attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def node_name(self) -> str:
        return next((a.node_name for a in reversed(self.attempts) if a.node_name), "")

    def ttft_s(self) -> float | None:
        return (self.first_token - self.start) / 1e9 if self.stream and self.first_token else None


_current: ContextVar[RequestRecord | None] = ContextVar("optimagpt_request_record", default=None)

# Requests on executors now, per model (this process): the metrics' gauge.
_in_flight: dict[str, int] = {}

# The instruments that read finished records (operations/instruments.py registers them at start-up).
_finishers: list[Callable[[RequestRecord], None]] = []


def current() -> RequestRecord | None:
    """The record of the API request this code runs for; None outside one (a page, a background task)."""
    return _current.get()


def request_open(*, method: str, path: str, client: str) -> RequestRecord:
    record = RequestRecord(method=method, path=path, client=client, operation=operation_of(path))
    _current.set(record)
    return record


def request_finished(record: RequestRecord, status: int) -> None:
    record.status = status
    record.done = time.time_ns()
    for finish in _finishers:
        finish(record)


def in_flight_by_model() -> dict[str, int]:
    """A copy (a scrape reads it from a thread while the event loop changes it: dict() copies in one step)."""
    return {model: n for model, n in dict(_in_flight).items() if n > 0}


def routed(model: str, delta: int) -> None:
    """A request took (+1) or gave back (-1) its executor."""
    _in_flight[model] = _in_flight.get(model, 0) + delta
    if _in_flight[model] <= 0:
        del _in_flight[model]


def finisher_add(finish: Callable[[RequestRecord], None]) -> None:
    if finish not in _finishers:
        _finishers.append(finish)


_OPERATIONS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions",
               "/v1/embeddings": "embeddings", "/v1/responses": "responses", "/v1/models": "models"}


def operation_of(path: str) -> str:
    """A short name for what a path does, for labels and filters: a bounded set, never an id from the path."""
    known = _OPERATIONS.get(path.rstrip("/"))
    if known:
        return known
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["v1"] and len(parts) > 1:
        return {"responses": "responses.read", "models": "models"}.get(parts[1], "other")
    if parts[:2] == ["optima", "v1"] and len(parts) > 2:
        return "optima." + parts[2][:24] if parts[2].isidentifier() else "optima.other"
    return "other"


# -- what the request path notes ---------------------------------------------------------------------
def note_auth(start: int, principal: Any) -> None:
    record = _current.get()
    if record is None:
        return
    record.auth_start, record.auth_end = start, time.time_ns()
    if principal is not None:
        key = getattr(principal, "api_key", None)
        record.key_prefix = key.prefix if key is not None else ""
        record.user_id = principal.user_id


def note_model(model: str, stream: bool) -> None:
    record = _current.get()
    if record is not None:
        record.model, record.stream = model, stream


def note_error(code: str | None) -> None:
    record = _current.get()
    if record is not None and code:
        record.error_code = code


def note_attempt_start() -> Attempt | None:
    """Routing of one attempt begins."""
    record = _current.get()
    if record is None:
        return None
    attempt = Attempt(route_start=time.time_ns())
    record.attempts.append(attempt)
    record.last_delta = 0  # a new round (MCP) or a retry: the wait before it is no gap between tokens
    return attempt


def note_queued() -> None:
    """The attempt being routed waits in its model's queue."""
    record = _current.get()
    if record is not None and record.attempts:
        record.attempts[-1].queued = True


def note_event(kind: str) -> None:
    """An event of the reply came from the node: the first token, the gaps between streamed ones, the end."""
    record = _current.get()
    if record is None or not record.attempts:
        return
    now = time.time_ns()
    attempt = record.attempts[-1]
    if not attempt.first:
        attempt.first = now
    if kind == "end":
        attempt.end = now
        return
    if not record.first_token:
        record.first_token = now
    elif record.last_delta:
        record.gaps.append((now - record.last_delta) / 1e9)
    record.last_delta = now


def note_tool_start(server: str, tool: str) -> ToolCall | None:
    record = _current.get()
    if record is None:
        return None
    call = ToolCall(server=server, tool=tool, start=time.time_ns())
    record.tools.append(call)
    return call


def note_usage(usage: dict[str, Any]) -> None:
    record = _current.get()
    if record is not None:
        record.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        record.completion_tokens += int(usage.get("completion_tokens") or 0)
