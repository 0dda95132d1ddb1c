"""Supervision of one llama.cpp inference process, and the multiplexing of requests onto it.

The process is `node_agent.runtimes.llama_cpp_worker`, spoken to over its own
stdin and stdout: no port, no secret to leak. Requests are queued inside the
worker, which generates up to `parallel` replies together (continuous batching,
node_agent/runtimes/batching.py); several processes of one model (replicas)
give more slots still, each with its own copy of the key-value cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..protocol import OP_CANCEL, error_event, pipe_frame

log = logging.getLogger("node_agent.runtime")

# An event line from the worker, forwarded as is; and its parsed form.
EventSink = Callable[[str, dict[str, Any]], Coroutine[Any, Any, None]]

MAX_CONSECUTIVE_CRASHES = 3
# A process that served requests for this long before dying did not crash-loop;
# its next death starts the count again.
STABLE_RUN_S = 60.0
PIPE_LIMIT = 64 * 1024 * 1024  # one line carries a whole embedding batch
# What a debugger prints about a crashed process: frames, addresses, thread and library chatter.
_BACKTRACE_LINE = re.compile(r"^\s*(#\d+|\[New |\[Thread |\[Inferior |0x[0-9a-f]+|Using host libthread_db|"
                             r"Thread \d+ |warning: |ptrace|\(gdb\)|Backtrace|.*\bin \?\? \(\))")


@dataclass(frozen=True)
class ProcessConfig:
    model_path: str
    n_ctx: int
    threads: int
    n_gpu_layers: int
    chat_format: str | None = None
    max_tokens_cap: int = 0
    stream_interval_ms: float = 0.0
    embedding: bool = False
    parallel: int = 1  # requests one process decodes together, each in its own sequence of n_ctx tokens
    load_timeout_s: float = 120.0
    # A process with requests in flight that writes nothing for this long is hung: killed, counted as a crash.
    hang_timeout_s: float = 300.0

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
            "--parallel",
            str(self.parallel),
        ]
        if self.chat_format:
            argv += ["--chat-format", self.chat_format]
        if self.embedding:
            argv.append("--embedding")
        return argv


@dataclass
class _Request:
    sink: EventSink
    frame: bytes  # the request as written to the worker's stdin
    request_json: str
    answered: bool = False  # an event went out: the client has seen something, so no replay
    crashed: bool = False  # the process died while computing it; if it dies on it again, it fails alone


class LlamaCppProcess:
    """One supervised worker: restarted after a crash, given up after 3 crashes in a row.

    `state` is one of offline, starting, online, stopping, failed; every change
    is reported through `on_state`. While the process (re)starts, requests wait
    in a backlog and go to it once it is ready; a request the dead process had
    not answered at all is replayed once on the next one, so a crash loses only
    replies already under way.
    """

    def __init__(self, config: ProcessConfig, on_state: Callable[[], None]) -> None:
        self.config = config
        self.state = "offline"
        self.last_error = ""
        self.pid: int | None = None
        self.n_ctx = 0  # as the running worker reports it
        self.parallel = config.parallel  # as the running worker reports it
        self._on_state = on_state
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._requests: dict[str, _Request] = {}
        self._backlog: list[str] = []  # request ids not yet written to a process, oldest first
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._wanted = False
        self._last_progress = 0.0
        self._hung = False
        self._computing: set[str] = set()  # the requests the worker said it began and has not ended
        self._culprit_found = False  # the last crash was a request's that crashed the process before

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wanted = True
            self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.config.model_path}")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the process and free its memory; requests in flight or waiting end with an error."""
        self._wanted = False
        if self._task is None:
            self._fail_all("the model was stopped")
            return
        self._set_state("stopping")
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        self._fail_all("the model was stopped")
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
            if self._culprit_found:
                # One request crashed the process twice and has failed alone: neither crash was the model's.
                crashes = max(crashes - 1, 0)
            else:
                crashes = 1 if time.monotonic() - started > STABLE_RUN_S else crashes + 1
            self.last_error = error
            log.warning("inference process for %s ended (%s); crash %d of %d",
                        self.config.model_path, error, crashes, MAX_CONSECUTIVE_CRASHES)
            if crashes >= MAX_CONSECUTIVE_CRASHES:
                self._set_state("failed")
                self._fail_all("the model's inference process keeps crashing")
                return
            self._set_state("starting")
            # A first crash restarts at once (requests are waiting); crashing again backs off: 1 s, 2 s, ...
            await asyncio.sleep(0.0 if crashes <= 1 else min(2.0 ** (crashes - 2), 10.0))
        self._set_state("offline")

    async def _run_once(self) -> str:
        """Run the process until it exits; return why it ended."""
        self._set_state("starting")
        self._stderr_tail.clear()
        self._hung = False
        proc = await asyncio.create_subprocess_exec(
            *self.config.argv(),
            env={**os.environ, "GGML_NO_BACKTRACE": "1"},  # no debugger attached to print a crash's frames
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=PIPE_LIMIT,
            start_new_session=True,  # a Ctrl-C in the agent's terminal is the agent's to handle
        )
        self._proc = proc
        self.pid = proc.pid
        stderr_task = asyncio.create_task(self._drain_stderr(proc))
        watchdog: asyncio.Task[None] | None = None
        try:
            assert proc.stdout is not None
            try:
                ready = await asyncio.wait_for(proc.stdout.readline(), self.config.load_timeout_s)
            except TimeoutError:
                proc.kill()
                return f"model did not load within {self.config.load_timeout_s:.0f} s"
            if not ready:
                await proc.wait()
                return self._exit_reason(proc)
            with contextlib.suppress(ValueError, AttributeError):
                said = json.loads(ready)
                self.n_ctx = int(said.get("n_ctx") or 0)
                self.parallel = int(said.get("parallel") or 1)
            self.last_error = ""
            self._last_progress = time.monotonic()
            self._set_state("online")
            self._write_backlog()
            watchdog = asyncio.create_task(self._watch_progress(proc))
            while line := await proc.stdout.readline():
                self._last_progress = time.monotonic()
                await self._dispatch(line)
            await proc.wait()
            if self._hung:
                return (f"no progress for {self.config.hang_timeout_s:.0f} s with requests in flight; "
                        "killed as hung")
            return self._exit_reason(proc)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            await asyncio.wait_for(stderr_task, 5)
            self._proc = None
            self.pid = None
            self._requeue_or_fail()

    async def _watch_progress(self, proc: asyncio.subprocess.Process) -> None:
        """Kill a process that has work but writes nothing for hang_timeout_s (a hang counts as a crash)."""
        timeout = self.config.hang_timeout_s
        while proc.returncode is None:
            await asyncio.sleep(min(1.0, timeout / 4))
            if self._written() and time.monotonic() - self._last_progress > timeout:
                log.warning("inference process %s made no progress for %.0f s; killing it", proc.pid, timeout)
                self._hung = True
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return

    def _exit_reason(self, proc: asyncio.subprocess.Process) -> str:
        """How the process ended, with its last words: what admins see on the executor's page.

        A debugger's backtrace (ggml attaches gdb when it aborts, where gdb exists) says nothing to an
        admin and shows the process's memory layout: such lines stay in the node's debug log only.
        """
        said = [line for line in self._stderr_tail if not _BACKTRACE_LINE.match(line)]
        tail = " | ".join(said[-5:])
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
        if kind == "begin":  # the worker's own bookkeeping: which requests a crash now could be blamed on
            self._computing.add(rid)
            return
        if kind in ("end", "error"):
            self._computing.discard(rid)
        request = self._requests.pop(rid, None) if kind in ("end", "error") else self._requests.get(rid)
        if request is not None:
            request.answered = True
            await request.sink(text.rstrip("\n"), event)

    def _requeue_or_fail(self) -> None:
        """After the process ended: replay unanswered requests on the next one, fail the others.

        The requests it was computing when it died (several, in one batch) are each replayed once, first,
        and alone in the batch: so if the process dies again, the request it was computing is the one that
        kills it, and fails alone (`request_crashed`), and `_culprit_found` tells the supervisor not to
        count either crash. Requests it had not begun are replayed whatever happened.
        """
        restarting = self._wanted
        suspects, self._computing = self._computing, set()
        self._culprit_found = False
        replay: list[str] = []
        for rid, request in list(self._requests.items()):
            if rid in self._backlog:
                continue
            if not restarting or request.answered:
                self._fail(rid, "the inference process stopped")
            elif rid not in suspects:
                replay.append(rid)
            elif request.crashed:
                self._culprit_found = True
                log.warning("request %s crashed the inference process of %s twice; failing it alone",
                            rid, self.config.model_path)
                self._fail(rid, "This request crashed the model's inference process twice; it was not served.",
                           code="request_crashed", status=500)
            else:
                request.crashed = True
                request.frame = pipe_frame(json.dumps({**json.loads(request.request_json), "isolate": True}).encode())
                replay.insert(0, rid)
        self._backlog[:0] = replay

    def _fail_all(self, message: str) -> None:
        for rid in list(self._requests):
            self._fail(rid, message)

    def _fail(self, rid: str, message: str, *, code: str = "executor_lost", status: int = 502) -> None:
        request = self._requests.pop(rid, None)
        with contextlib.suppress(ValueError):
            self._backlog.remove(rid)
        if request is not None:
            event = error_event(rid, message, code=code, status=status)
            asyncio.create_task(request.sink(json.dumps(event), event))

    # -- requests -----------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def _written(self) -> int:
        """Requests the current process has been given and not yet answered in full (the backlog is a subset)."""
        return len(self._requests) - len(self._backlog)

    def submit(self, rid: str, request_json: str, sink: EventSink) -> bool:
        """Queue a request on the process; False when it is neither online nor (re)starting.

        `request_json` is one JSON object with op, id, stream and body (other
        keys are ignored), such as the link's request message passed on as it came.
        """
        if not self._wanted or self.state not in ("online", "starting"):
            return False
        self._requests[rid] = _Request(sink, pipe_frame(request_json.encode()), request_json)
        self._backlog.append(rid)
        if self.state == "online":
            self._write_backlog()
        return True

    def _write_backlog(self) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        if not self._written():
            self._last_progress = time.monotonic()  # idle until now: the hang clock starts here
        backlog, self._backlog = self._backlog, []
        for rid in backlog:
            proc.stdin.write(self._requests[rid].frame)

    def cancel(self, rid: str) -> None:
        """Stop generating for `rid` at the next token; its sink gets no more events."""
        self._requests.pop(rid, None)
        if rid in self._backlog:
            self._backlog.remove(rid)
            return
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(pipe_frame(json.dumps({"op": OP_CANCEL, "id": rid}).encode()))
