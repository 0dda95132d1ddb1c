"""Server-sent events as the API sends them: one compact JSON object per `data:` line."""

from __future__ import annotations

import json
from typing import Any

# No caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering): each event goes at once.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()
