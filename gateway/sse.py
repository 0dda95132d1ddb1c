"""Server-sent events as the API sends them: one compact JSON object per `data:` line."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

# No caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering): each event goes at once.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


async def sse_frames(events: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
    """Each event as a frame; closing the frames (the client left) closes the events, so their clean-up runs."""
    try:
        async for event in events:
            yield sse(event)
    finally:
        await events.aclose()
