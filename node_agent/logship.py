"""The agent's own log lines, kept briefly and sent to the gateway over the link (the node console's log).

Only the agent's loggers (`node_agent.*`) are shipped: the websockets library logs
every frame at DEBUG, prompts included, and those stay on the node.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

MAX_BUFFERED = 2000  # lines kept while no gateway is linked; the oldest go first


class LinkLogHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.buffer: deque[dict[str, Any]] = deque(maxlen=MAX_BUFFERED)
        self.addFilter(lambda record: record.name.startswith("node_agent"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self.buffer.append({"t": record.created, "level": record.levelname, "logger": record.name,
                                "message": message})
        except Exception:  # noqa: BLE001 - logging must never raise into the code that logs
            self.handleError(record)

    def take(self, limit: int = 500) -> list[dict[str, Any]]:
        """The oldest buffered lines, up to `limit`, removed from the buffer."""
        return [self.buffer.popleft() for _ in range(min(limit, len(self.buffer)))]


handler = LinkLogHandler()
