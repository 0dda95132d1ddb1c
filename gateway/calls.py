"""One request on its way to an executor, whatever serves it: the books every kind of call keeps.

`Call` is the base of the node call (gateway/dispatch.py) and the remote upstream's
(gateway/connectors/remote.py): both yield the node link protocol's events, raise its
`error` events as ApiError, release their router slot and record usage when done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings

from node_agent.protocol import error_event
from operations.record import note_error, note_event, note_usage
from optimagpt.errors import ApiError, UpstreamError, UpstreamTimeout

from . import stats as gateway_stats
from .limits import principal_record
from .principal import Principal
from .routing.router import Target, release

# Before its first event, a call looks this often whether what serves it is still linked.
LINK_CHECK_S = 2.0


def revoked_event(rid: str = "") -> dict[str, Any]:
    """The event that ends a request whose API key was revoked (marked, so the call still cancels it)."""
    return {**error_event(rid, "The API key was revoked.", code="api_key_revoked", status=401), "revoked": True}


def event_error(event: dict[str, Any]) -> ApiError:
    error = event.get("error") or {}
    status = int(error.get("status") or 502)
    if 400 <= status < 500:
        return ApiError(str(error.get("message", "invalid request")), status=status,
                        type=error.get("type") or "invalid_request_error", code=error.get("code"))
    return UpstreamError(str(error.get("message", "the node failed the request")), status=status,
                         code=error.get("code") or "node_error")


class Call:
    """One request on its way to an executor. Iterate `events()`; `close()` cancels it if unfinished.

    Subclasses say how events arrive (`_receive`) and how an unfinished request
    is called off (`_cancel`); this class keeps the books: the slot the router
    gave it (`target`, released on close), usage on the `end` event. `since` is when the client's
    request began (queueing included, for the delayed count); `deadline`, in loop
    time, when it must be over.
    """

    def __init__(self, target: Target, request_id: str, principal: Principal, *, since: float | None = None,
                 deadline: float | None = None) -> None:
        self.principal = principal
        self.target = target
        self.request_id = request_id
        self.finished = False
        self.counted = True  # False for an attempt that failed over: the request is counted once, by the last
        self._released = False
        self._started = time.monotonic()
        self._since = since if since is not None else self._started
        self._deadline = deadline if deadline is not None else \
            asyncio.get_running_loop().time() + settings.OPTIMAGPT_REQUEST_DEADLINE_S
        self._first_event_after: float | None = None
        gateway_stats.request_started(target.node_pk)

    def _revoked_event(self) -> dict[str, Any]:
        return revoked_event(self.request_id)

    async def revoke(self) -> None:
        """End the request because its API key was revoked, whether queued or streaming."""
        raise NotImplementedError

    async def _receive(self, timeout_s: float) -> dict[str, Any]:
        """The next event; asyncio.TimeoutError when none came within `timeout_s`."""
        raise NotImplementedError

    async def _cancel(self) -> None:
        raise NotImplementedError

    async def _target_linked(self) -> bool:
        """Whether what serves the request can still answer it (asked while waiting for its first event)."""
        return True

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events up to and including `end`; an `error` event is raised as ApiError, and then the owner
        closes the call (RoutedRequest may first mark it as an attempt that failed over)."""
        loop = asyncio.get_running_loop()
        timeout = settings.OPTIMAGPT_FIRST_EVENT_TIMEOUT_S
        close = True
        try:
            while True:
                wait_until = loop.time() + min(timeout, self._deadline - loop.time())
                while True:
                    # Before the first event, look every LINK_CHECK_S whether the link is still there: a
                    # request sent as its link closed reached no one, and would wait for its whole timeout.
                    step = wait_until - loop.time()
                    if self._first_event_after is None:
                        step = min(step, LINK_CHECK_S)
                    try:
                        event = await self._receive(max(step, 0.001))
                        break
                    except TimeoutError:
                        if loop.time() >= self._deadline:
                            raise UpstreamTimeout("The request ran past its deadline.",
                                                  code="deadline_exceeded") from None
                        if loop.time() >= wait_until:
                            raise UpstreamTimeout("The node did not answer in time.") from None
                        if not await self._target_linked():
                            raise UpstreamError("The node disconnected.", status=502,
                                                code="node_disconnected") from None
                if self._first_event_after is None:
                    self._first_event_after = time.monotonic() - self._since
                kind = event.get("type")
                if kind == "error":
                    # A revoked request is still running: close() must cancel it.
                    self.finished = not event.get("revoked")
                    close = False
                    error = event_error(event)
                    note_error(error.code)
                    raise error
                note_event(str(kind))
                if kind == "end":
                    self.finished = True
                    if event.get("usage"):
                        note_usage(event["usage"])
                        await principal_record(principal=self.principal, usage=event["usage"])
                    yield event
                    return
                yield event
                timeout = settings.OPTIMAGPT_EVENT_TIMEOUT_S
        finally:
            if close:
                await self.close()

    async def close(self) -> None:
        if self._released:
            return
        self._released = True
        release(self.target, held_s=time.monotonic() - self._started)
        waited = self._first_event_after if self._first_event_after is not None else time.monotonic() - self._since
        gateway_stats.request_finished(self.target.node_pk, waited_s=waited, counted=self.counted)
        await self._cancel()
