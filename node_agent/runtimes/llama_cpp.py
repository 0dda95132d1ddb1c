"""Supervision of one llama.cpp inference process, and the multiplexing of requests onto it.

The process is `node_agent.runtimes.llama_cpp_worker`, spoken to over its own
stdin and stdout: no port, no secret to leak. Requests are queued inside the
worker and served one at a time; several processes of one model (replicas)
give more parallel slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("node_agent.runtime")

# An event line from the worker, forwarded as is; and its parsed form.
EventSink = Callable[[str, dict[str, Any]], Awaitable[None]]

MAX_CONSECUTIVE_CRASHES = 3
# A process that served requests for this long before dying did not crash-loop;
# its next death starts the count again.
STABLE_RUN_S = 60.0
PIPE_LIMIT = 64 * 1024 * 1024  # one line carries a whole embedding batch


@dataclass(frozen=True)
class ProcessConfig:
    model_path: str
    n_ctx: int
    threads: int
    n_gpu_layers: int
    chat_format: str | None = None
    max_tokens_cap: int = 0
    stream_interval_ms: float = 0.0
    load_timeout_s: float = 120.0

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "node_agent.runtimes.llama_cpp_worker",
            "--model",
            self.model_path,
            "--n-ctx",
            str(self.n_ctx),
            "--threads",
            str(self.threads),
            "--n-gpu-layers",
            str(self.n_gpu_layers),
            "--max-tokens-cap",
            str(self.max_tokens_cap),
            "--stream-interval-ms",
            str(self.stream_interval_ms),
        ]
        if self.chat_format:
            argv += ["--chat-format", self.chat_format]
        return argv


class LlamaCppProcess:
    """One supervised worker: restarted after a crash, given up after 3 crashes in a row.

    `state` is one of offline, starting, online, stopping, failed; every change
    is reported through `on_state`.
    """

    def __init__(self, config: ProcessConfig, on_state: Callable[[], None]) -> None:
        self.config = config
        self.state = "offline"
        self.last_error = ""
        self.pid: int | None = None
        self._on_state = on_state
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._sinks: dict[str, EventSink] = {}
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._wanted = False

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wanted = True
            self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.config.model_path}")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the process and free its memory; requests in flight end with an error."""
        self._wanted = False
        if self._task is None:
            return
        self._set_state("stopping")
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except asyncio.TimeoutError:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        self._set_state("offline")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._on_state()

    async def _supervise(self) -> None:
        crashes = 0
        while self._wanted:
            started = time.monotonic()
            error = await self._run_once()
            if not self._wanted:
                break
            crashes = 1 if time.monotonic() - started > STABLE_RUN_S else crashes + 1
            self.last_error = error
            log.warning("inference process for %s ended (%s); crash %d of %d",
                        self.config.model_path, error, crashes, MAX_CONSECUTIVE_CRASHES)
            if crashes >= MAX_CONSECUTIVE_CRASHES:
                self._set_state("failed")
                return
            self._set_state("starting")
            await asyncio.sleep(min(0.5 * 2 ** (crashes - 1), 10.0))
        self._set_state("offline")

    async def _run_once(self) -> str:
        """Run the process until it exits; return why it ended."""
        self._set_state("starting")
        self._stderr_tail.clear()
        proc = await asyncio.create_subprocess_exec(
            *self.config.argv(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=PIPE_LIMIT,
            start_new_session=True,  # a Ctrl-C in the agent's terminal is the agent's to handle
        )
        self._proc = proc
        self.pid = proc.pid
        stderr_task = asyncio.create_task(self._drain_stderr(proc))
        try:
            assert proc.stdout is not None
            try:
                ready = await asyncio.wait_for(proc.stdout.readline(), self.config.load_timeout_s)
            except asyncio.TimeoutError:
                proc.kill()
                return f"model did not load within {self.config.load_timeout_s:.0f} s"
            if not ready:
                await proc.wait()
                return self._exit_reason(proc)
            self.last_error = ""
            self._set_state("online")
            while line := await proc.stdout.readline():
                await self._dispatch(line)
            await proc.wait()
            return self._exit_reason(proc)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            await asyncio.wait_for(stderr_task, 5)
            self._proc = None
            self.pid = None
            self._fail_in_flight("the inference process stopped")

    def _exit_reason(self, proc: asyncio.subprocess.Process) -> str:
        tail = " | ".join(self._stderr_tail)
        return f"exit code {proc.returncode}" + (f": {tail}" if tail else "")

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self._stderr_tail.append(text)
                log.debug("[%s] %s", proc.pid, text)

    async def _dispatch(self, line: bytes) -> None:
        text = line.decode()
        try:
            event = json.loads(text)
        except ValueError:
            log.warning("unreadable line from inference process: %.200s", text)
            return
        rid = event.get("id")
        kind = event.get("type")
        sink = self._sinks.pop(rid, None) if kind in ("end", "error") else self._sinks.get(rid)
        if sink is not None:
            await sink(text.rstrip("\n"), event)

    def _fail_in_flight(self, message: str) -> None:
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            event = {"type": "error", "id": rid,
                     "error": {"message": message, "type": "server_error", "code": "executor_lost", "status": 502}}
            asyncio.create_task(sink(json.dumps(event), event))

    # -- requests -----------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._sinks)

    def submit(self, rid: str, request_json: str, sink: EventSink) -> bool:
        """Queue a request on the process; False when it is not online.

        `request_json` is one JSON object with op, id, stream and body (other
        keys are ignored), such as the link's request message passed on as it came.
        """
        proc = self._proc
        if self.state != "online" or proc is None or proc.stdin is None or proc.stdin.is_closing():
            return False
        self._sinks[rid] = sink
        proc.stdin.write(request_json.encode() + b"\n")
        return True

    def cancel(self, rid: str) -> None:
        """Stop generating for `rid` at the next token; its sink gets no more events."""
        self._sinks.pop(rid, None)
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write((json.dumps({"op": "cancel", "id": rid}) + "\n").encode())
