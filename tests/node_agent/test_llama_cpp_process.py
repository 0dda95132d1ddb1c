"""The supervised inference process, with the real model: requests, cancellation, crash recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from node_agent.runtimes.llama_cpp import LlamaCppProcess, ProcessConfig


async def _wait_state(process: LlamaCppProcess, state: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while process.state != state:
        assert time.monotonic() < deadline, f"state stayed {process.state}, wanted {state}"
        await asyncio.sleep(0.05)


async def _request(process: LlamaCppProcess, request: dict[str, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def sink(raw: str, event: dict[str, Any]) -> None:
        events.append(event)
        if event["type"] in ("end", "error"):
            done.set()

    assert process.submit(request["id"], json.dumps(request), sink)
    await asyncio.wait_for(done.wait(), 60)
    return events


@pytest.fixture
async def process(model_path: Path):  # type: ignore[no-untyped-def]
    proc = LlamaCppProcess(ProcessConfig(model_path=str(model_path), n_ctx=2048, threads=2, n_gpu_layers=0),
                           on_state=lambda: None)
    proc.start()
    await _wait_state(proc, "online")
    yield proc
    await proc.stop()
    assert proc.state == "offline"


async def test_it_streams_token_deltas_then_ends_with_usage(process: LlamaCppProcess) -> None:
    events = await _request(process, {"op": "chat", "id": "a", "stream": True,
                                      "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}})
    assert [e["type"] for e in events] == ["delta"] * (len(events) - 1) + ["end"]
    assert events[-1]["usage"]["completion_tokens"] == 5


async def test_cancel_stops_generation_within_a_second(process: LlamaCppProcess) -> None:
    events: list[dict[str, Any]] = []

    async def sink(raw: str, event: dict[str, Any]) -> None:
        events.append(event)

    process.submit("long", json.dumps({"op": "chat", "id": "long", "stream": True, "body": {
        "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000,
        "logit_bias": {"2": -100}}}), sink)
    while len(events) < 3:
        await asyncio.sleep(0.01)
    process.cancel("long")
    started = time.monotonic()
    # The next request can only start once the cancelled one has stopped.
    after = await _request(process, {"op": "chat", "id": "next", "stream": False,
                                     "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}})
    assert after[-1]["type"] == "end"
    assert time.monotonic() - started < 1.0


async def test_a_bad_request_is_an_error_event_and_the_process_lives_on(process: LlamaCppProcess) -> None:
    events = await _request(process, {"op": "chat", "id": "bad", "stream": False, "body": {
        "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "missing"}}}})
    assert events[-1]["type"] == "error" and events[-1]["error"]["status"] == 400
    assert process.state == "online"


async def test_a_killed_process_is_restarted_a_started_reply_fails_and_an_unanswered_one_is_replayed(
        process: LlamaCppProcess) -> None:
    streaming: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []

    async def sink_of(events: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
        async def sink(raw: str, event: dict[str, Any]) -> None:
            events.append(event)
        return sink

    process.submit("doomed", json.dumps({"op": "chat", "id": "doomed", "stream": True, "body": {
        "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000}}),
        await sink_of(streaming))
    # Queued behind the long reply inside the worker: it has had no answer when the process dies.
    process.submit("behind", json.dumps({"op": "chat", "id": "behind", "stream": False, "body": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}), await sink_of(queued))
    while not streaming:
        await asyncio.sleep(0.01)
    first_pid = process.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    await _wait_state(process, "starting", 5)
    # Sent while the process restarts: it waits for the new one instead of being refused.
    meanwhile = asyncio.create_task(_request(process, {"op": "chat", "id": "meanwhile", "stream": False, "body": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}}))
    await _wait_state(process, "online", 30)
    assert process.pid != first_pid
    assert streaming[-1]["type"] == "error" and streaming[-1]["error"]["code"] == "executor_lost", \
        "a reply already under way cannot be resumed: it ends with an error, never with duplicated text"
    assert (await asyncio.wait_for(meanwhile, 30))[-1]["type"] == "end"
    deadline = time.monotonic() + 30
    while not queued and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [e["type"] for e in queued] == ["end"] and queued[0]["usage"]["completion_tokens"] <= 3


async def test_a_process_that_hangs_with_work_is_killed_and_restarted(model_path: Path) -> None:
    proc = LlamaCppProcess(ProcessConfig(model_path=str(model_path), n_ctx=512, threads=2, n_gpu_layers=0,
                                         hang_timeout_s=1.0), on_state=lambda: None)
    proc.start()
    try:
        await _wait_state(proc, "online")
        hung_pid = proc.pid
        assert hung_pid is not None
        os.kill(hung_pid, signal.SIGSTOP)  # alive, but makes no progress at all
        events: list[dict[str, Any]] = []

        async def sink(raw: str, event: dict[str, Any]) -> None:
            events.append(event)

        assert proc.submit("stuck", json.dumps({"op": "chat", "id": "stuck", "stream": False, "body": {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}), sink)
        await _wait_state(proc, "starting", 10)
        assert "hung" in proc.last_error
        await _wait_state(proc, "online", 30)
        assert proc.pid != hung_pid
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert events and events[-1]["type"] == "end", "the unanswered request is served by the new process"
    finally:
        await proc.stop()


async def test_it_gives_up_after_three_crashes_in_a_row(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = LlamaCppProcess(ProcessConfig(model_path=str(bad), n_ctx=512, threads=1, n_gpu_layers=0),
                           on_state=lambda: None)
    proc.start()
    await _wait_state(proc, "failed", 60)
    assert proc.last_error
    await proc.stop()
