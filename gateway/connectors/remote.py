"""Remote upstreams: an OpenAI-compatible server (another gateway, a cloud API) routed like a local executor.

The gateway calls the upstream itself over HTTP(S) and turns its answers into
the same events a node sends (delta, end, error), so the API code shapes both
alike. The upstream's key is stored encrypted (optimagpt/secrets.py) and never
appears in an error, a log line or a page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from channels.db import database_sync_to_async
from django.dispatch import receiver

from node_agent.protocol import OP_CHAT, OP_COMPLETION, OP_EMBEDDING, OP_TOKENIZE, error_event
from nodes.models import Executor
from nodes.signals import executors_changed
from optimagpt.errors import UpstreamError
from optimagpt.outbound import OutboundRefused, checked_pool, url_check_resolved
from optimagpt.secrets import SecretUnreadable

from ..calls import Call
from ..principal import Principal
from ..routing.router import Target

log = logging.getLogger("optimagpt.gateway.remote")

PATHS = {OP_CHAT: "/chat/completions", OP_COMPLETION: "/completions", OP_EMBEDDING: "/embeddings"}
CONNECT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Upstream:
    base_url: str
    model: str
    key: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


_upstreams: dict[int, Upstream] = {}
_clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}


@receiver(executors_changed)
def _forget_upstreams(sender: Any, **kwargs: Any) -> None:
    _upstreams.clear()


def _client() -> httpx.AsyncClient:
    """One pooled client per event loop (an httpx client belongs to the loop it first ran on)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        transport = httpx.AsyncHTTPTransport()
        # Every connection goes to an address optimagpt/outbound.py checked, redirects and reconnections included.
        transport._pool = checked_pool(httpcore.AsyncConnectionPool, httpcore.AnyIOBackend, httpcore.ConnectError,
                                       httpx.create_ssl_context(),
                                       max_connections=200, max_keepalive_connections=50)
        client = _clients[loop] = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),  # reads are bounded by Call.events
        )
    return client


def upstream_for(executor: Executor) -> Upstream:
    return Upstream(base_url=executor.base_url, model=executor.upstream_model or executor.model_id,
                    key=executor.upstream_key())


async def _upstream(pk: int) -> Upstream:
    upstream = _upstreams.get(pk)
    if upstream is None:
        executor = await database_sync_to_async(Executor.objects.get)(pk=pk)
        upstream = _upstreams[pk] = upstream_for(executor)
    return upstream


def _error(message: str, *, status: int = 502, code: str = "upstream_error",
           kind: str = "server_error") -> dict[str, Any]:
    return error_event("", message, code=code, status=status, kind=kind)


def _upstream_message(response_body: bytes) -> str:
    try:
        error = json.loads(response_body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message)[:500] if message else ""
    except (ValueError, AttributeError):
        return ""


class RemoteCall(Call):
    """One request to a remote upstream. A task does the HTTP and queues events; closing it cancels the request
    (the connection closes, which is how an OpenAI-compatible server learns the client went away)."""

    def __init__(self, target: Target, principal: Principal, upstream: Upstream, op: str, body: dict[str, Any],
                 stream: bool, **timing: float) -> None:
        super().__init__(target, uuid.uuid4().hex, principal, **timing)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(upstream, op, body, stream), name="remote upstream call")

    async def revoke(self) -> None:
        self._queue.put_nowait(self._revoked_event())

    async def _receive(self, timeout_s: float) -> dict[str, Any]:
        return await asyncio.wait_for(self._queue.get(), timeout_s)

    async def _cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _pump(self, upstream: Upstream, op: str, body: dict[str, Any], stream: bool) -> None:
        if op == OP_TOKENIZE:  # OpenAI's API has no tokenizer: estimated, and said to be
            self._queue.put_nowait(_estimated_counts(self.request_id, body))
            return
        # `truncation` is OptimaGPT's (the Responses API's, done by our nodes): an upstream's window is unknown here.
        body = {**{k: v for k, v in body.items() if k != "truncation"}, "model": upstream.model}
        if op == OP_EMBEDDING:
            body["encoding_format"] = "float"
        if stream:
            body["stream_options"] = {"include_usage": True}  # usage is what budgets and accounting count
        try:
            async with _client().stream("POST", upstream.url(PATHS[op]), json=body,
                                        headers=upstream.headers()) as response:
                if response.status_code >= 400:
                    self._queue.put_nowait(self._status_error(response.status_code, await response.aread()))
                elif stream:
                    async for event in _stream_events(response, op):
                        self._queue.put_nowait(event)
                else:
                    self._queue.put_nowait(_whole_event(json.loads(await response.aread()), op))
        except asyncio.CancelledError:
            raise
        except httpx.TimeoutException:
            self._queue.put_nowait(_error("The remote upstream did not answer in time.", status=504, code="timeout"))
        except httpx.HTTPError as exc:
            # The exception text can carry the URL, never the key (it travels in a header).
            self._queue.put_nowait(_error(f"The remote upstream could not be reached ({type(exc).__name__})."))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self._queue.put_nowait(_error("The remote upstream sent an answer that is not OpenAI's format."))

    @staticmethod
    def _status_error(status: int, response_body: bytes) -> dict[str, Any]:
        message = _upstream_message(response_body)
        if status in (401, 403):
            # The client's credentials were fine (they are ours); the gateway's key for the upstream is not.
            return _error("The remote upstream refused the gateway's credentials.", code="upstream_auth_failed")
        if 400 <= status < 500 and status != 429:
            return _error(message or f"The remote upstream refused the request ({status}).", status=status,
                          code="upstream_rejected", kind="invalid_request_error")
        return _error(f"The remote upstream failed ({status}){': ' + message if message else ''}.")


def _estimated_counts(request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Token counts at about four characters a token, for the context visualiser; the window is unknown."""
    counts = {"system": 0, "tools": 0, "user": 0, "assistant": 0, "template": 0}
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            role = message.get("role")
            part = "system" if role in ("system", "developer") else role if role in ("assistant", "user") else "tools"
            counts[part] += (len(content) + 3) // 4
    counts["template"] = 4 * len(body.get("messages") or [])
    return {"type": "end", "id": request_id, "finish_reason": "stop",
            "counts": {**counts, "prompt": sum(counts.values()), "window": None, "estimated": True}}


async def _stream_events(response: httpx.Response, op: str) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's server-sent events as node events: deltas, then one end with finish reason and usage."""
    finish = "stop"
    usage: dict[str, Any] | None = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("error"):
            yield _error(_upstream_message(data.encode()) or "The remote upstream failed mid-stream.")
            return
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            if op == OP_CHAT:
                delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role" and v is not None}
                if delta:
                    yield {"type": "delta", "delta": delta}
            elif choice.get("text"):
                yield {"type": "delta", "text": choice["text"]}
            finish = choice.get("finish_reason") or finish
    yield {"type": "end", "finish_reason": finish, "usage": _usage(usage)}


def _whole_event(payload: dict[str, Any], op: str) -> dict[str, Any]:
    usage = _usage(payload.get("usage"))
    if op == OP_EMBEDDING:
        data = sorted(payload["data"], key=lambda d: d.get("index", 0))
        return {"type": "end", "finish_reason": "stop", "usage": usage, "embeddings": [d["embedding"] for d in data]}
    choice = payload["choices"][0]
    event = {"type": "end", "finish_reason": choice.get("finish_reason") or "stop", "usage": usage}
    if op == OP_CHAT:
        event["message"] = choice["message"]
    else:
        event["text"] = choice["text"]
    return event


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def remote_call_start(*, target: Target, principal: Principal, op: str, body_json: str,
                            stream: bool, **timing: float) -> RemoteCall:
    try:
        upstream = await _upstream(target.executor_pk)
    except (Executor.DoesNotExist, SecretUnreadable) as exc:
        raise UpstreamError(f"The remote upstream is not usable: {exc}") from None
    return RemoteCall(target, principal, upstream, op, json.loads(body_json), stream, **timing)


UNREACHABLE = "unreachable: no OpenAI-compatible API answered at this address"

async def remote_address_check(base_url: str) -> None:
    """Refuse URLs with credentials, and hosts that resolve to link-local or metadata addresses (optimagpt/outbound.py),
    with a message for the admin before anything is probed; every connection is checked again as it is made."""
    try:
        await url_check_resolved(base_url, name="base_url")
    except OutboundRefused as exc:
        message = str(exc).replace("must not hold credentials", "must not hold credentials; give the key as api_key")
        raise OutboundRefused(message) from None


def same_origin(first: str, second: str) -> bool:
    a, b = urlsplit(first), urlsplit(second)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


async def remote_probe(upstream: Upstream) -> str:
    """Ask the upstream for its models; "" when it answers and serves our model, else what is wrong.

    What fails below HTTP says only "unreachable": which way a connection failed (refused, reset, timed
    out) would tell a caller what listens on hosts it cannot reach itself.
    """
    try:
        response = await _client().get(upstream.url("/models"), headers=upstream.headers(),
                                       timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError:
        return UNREACHABLE
    if response.status_code in (401, 403):
        return f"the upstream refused the key ({response.status_code})"
    if response.status_code != 200:
        return UNREACHABLE
    try:
        listed = {m["id"] for m in response.json().get("data") or ()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return UNREACHABLE
    if listed and upstream.model not in listed:
        return f"the upstream does not list the model {upstream.model!r}"
    return ""
