"""Background responses: each runs in a task of this gateway process, not tied to the client that asked.

It touches its stored row every HEARTBEAT_S (saving the output so far, for polling with GET), notices a
cancel made through another gateway process there, and is stored failed if this process stops first
(on shutdown here; a process that died is noticed by its row going stale, responses_api/services.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from optimagpt.errors import ApiError

from . import services
from .runner import ResponseRun

log = logging.getLogger("optimagpt.responses")

HEARTBEAT_S = 2.0


class Background:
    """A background response running in this process, and the streams that listen to it."""

    def __init__(self, run: ResponseRun) -> None:
        self.run = run
        self.listeners: list[asyncio.Queue[dict[str, Any] | None]] = []
        self.stop_reason = ""  # why it was cancelled: "cancelled" (asked for) or "shutdown"
        self.task: asyncio.Task[None] | None = None

    def publish(self, event: dict[str, Any] | None) -> None:
        for queue in self.listeners:
            queue.put_nowait(event)


_running: dict[str, Background] = {}


def running(response_id: str) -> Background | None:
    return _running.get(response_id)


def background_start(run: ResponseRun, listen: bool = False) -> tuple[Background, asyncio.Queue[Any] | None]:
    """Run `run` in a task of its own (its row already saved as queued); with `listen`, a queue of its events
    (None after the last) for a stream that wants them."""
    job = Background(run)
    queue: asyncio.Queue[dict[str, Any] | None] | None = None
    if listen:
        queue = asyncio.Queue()
        job.listeners.append(queue)
    _running[run.id] = job

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if not await services.response_touch(run):
                job.stop_reason = "cancelled"  # cancelled through another gateway process
                assert job.task is not None
                job.task.cancel()
                return

    async def main() -> None:
        beating = asyncio.create_task(heartbeat())
        try:
            try:
                await run.prepare()
                await services.response_touch(run)  # in progress now
                async for event in run.events():
                    job.publish(event)
            except ApiError as exc:
                run.fail(exc)
                job.publish(run._event("response.failed", response=run.object()))
            except asyncio.CancelledError:
                run.status = "cancelled" if job.stop_reason == "cancelled" else "failed"
                if run.status == "failed":
                    run.error = services.STOPPED_ERROR
                    job.publish(run._event("response.failed", response=run.object()))
                run.completed_at = int(time.time())
            except Exception:
                log.exception("background response %s failed", run.id)
                run.fail(ApiError("The gateway failed to make this response.", status=500, type="server_error",
                                  code="server_error"))
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            job.publish(None)
            try:
                await asyncio.shield(services.response_save(run, final=True))
            except Exception:
                log.exception("could not store background response %s", run.id)
            finally:
                _running.pop(run.id, None)

    job.task = asyncio.create_task(main(), name=f"background response {run.id}")
    return job, queue


def background_cancel(response_id: str, reason: str = "cancelled") -> bool:
    job = _running.get(response_id)
    if job is None or job.task is None or job.task.done():
        return False
    job.stop_reason = reason
    job.task.cancel()
    return True


async def background_stop_all(timeout_s: float = 5.0) -> None:
    """Stop every background response of this process (it is shutting down); each is stored as failed."""
    jobs = [job for job in _running.values() if job.task is not None]
    for job in jobs:
        background_cancel(job.run.id, "shutdown")
    if jobs:
        await asyncio.wait([job.task for job in jobs if job.task is not None], timeout=timeout_s)
