"""Continuous batching with the real model: eight requests decoded together by one inference process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from node_agent.runtimes.llama_cpp import LlamaCppProcess, ProcessConfig

WORDS = ("candle", "monkey", "garden", "rocket", "tiger", "lemon", "pencil", "dragon")  # each one SmolLM2 repeats


@pytest.fixture
async def process(model_path: Path) -> AsyncIterator[LlamaCppProcess]:
    proc = LlamaCppProcess(ProcessConfig(model_path=str(model_path), n_ctx=1024, threads=2, n_gpu_layers=0,
                                         parallel=8), on_state=lambda: None)
    proc.start()
    deadline = time.monotonic() + 60
    while proc.state != "online":
        assert time.monotonic() < deadline, f"state stayed {proc.state}"
        await asyncio.sleep(0.05)
    yield proc
    await proc.stop()


class Reply:
    """One request's events, as the agent's sink receives them."""

    def __init__(self, process: LlamaCppProcess, rid: str, request: dict[str, Any]) -> None:
        self.events: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self.rid = rid
        assert process.submit(rid, json.dumps({"id": rid, **request}), self.sink)

    async def sink(self, raw: str, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["type"] in ("end", "error"):
            self.done.set()

    async def wait(self, timeout_s: float = 120) -> dict[str, Any]:
        await asyncio.wait_for(self.done.wait(), timeout_s)
        return self.events[-1]

    @property
    def streamed(self) -> str:
        return "".join(e.get("text") or e.get("delta", {}).get("content") or "" for e in self.events
                       if e["type"] == "delta")


def _repeat(word: str, max_tokens: int, **more: Any) -> dict[str, Any]:
    """A prompt whose continuation is its own word again and again: replies that cannot be mistaken."""
    return {"op": "completion", "stream": True, "body": {"prompt": " ".join([word] * 12), "max_tokens": max_tokens,
                                                         "temperature": 0, **more}}


async def _wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def test_eight_streams_decode_together_each_with_its_own_text_and_exact_usage(
        process: LlamaCppProcess, model_path: Path) -> None:
    from llama_cpp import Llama

    vocab = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    together = 0

    async def watch() -> None:
        nonlocal together
        while True:
            together = max(together, len(process._computing))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    replies = [Reply(process, f"w{i}", _repeat(word, 24)) for i, word in enumerate(WORDS)]
    ends = [await r.wait() for r in replies]
    watcher.cancel()
    assert together == 8, "all eight were in the batch at once"
    for word, reply, end in zip(WORDS, replies, ends, strict=True):
        assert end["type"] == "end" and end["finish_reason"] == "length", end
        prompt = " ".join([word] * 12)
        assert end["usage"] == {"prompt_tokens": len(vocab.tokenize(prompt.encode(), add_bos=True)),
                                "completion_tokens": 24,
                                "total_tokens": len(vocab.tokenize(prompt.encode(), add_bos=True)) + 24}
        text = reply.streamed
        assert text.count(word) >= 4, (word, text)
        assert not any(other in text for other in WORDS if other != word), (word, text)


async def test_a_cancelled_stream_frees_its_slot_within_a_second_and_the_others_go_on(
        process: LlamaCppProcess) -> None:
    replies = [Reply(process, f"c{i}", _repeat(word, 120)) for i, word in enumerate(WORDS)]
    await _wait_for(lambda: all(r.streamed for r in replies), 60, "all eight stream")
    process.cancel("c3")
    cancelled_at = time.monotonic()
    ninth = Reply(process, "ninth", _repeat("silver", 4))
    await _wait_for(lambda: "ninth" in process._computing or ninth.done.is_set(), 5, "the ninth got a slot")
    assert time.monotonic() - cancelled_at < 1.0, "the cancelled request's slot was free within a second"
    assert (await ninth.wait())["type"] == "end" and "silver" in ninth.streamed
    for i, reply in enumerate(replies):
        if i == 3:
            assert not reply.done.is_set(), "a cancelled request's sink hears nothing more"
            continue
        end = await reply.wait()
        assert end["type"] == "end" and end["finish_reason"] in ("length", "stop"), end  # the model may end it
        assert (end["usage"]["completion_tokens"] == 120) == (end["finish_reason"] == "length")


async def test_a_json_schema_and_free_text_in_one_batch_each_keep_their_own_constraint(
        process: LlamaCppProcess) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
              "required": ["city", "people"]}
    chat = {"messages": [{"role": "user", "content": "Name a big city and how many people live there."}],
            "max_tokens": 80, "temperature": 0.7, "seed": 7}
    constrained = [Reply(process, f"j{i}", {"op": "chat", "stream": bool(i % 2), "body": {
        **chat, "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}})
        for i in range(3)]
    free = [Reply(process, f"f{i}", _repeat(word, 40)) for i, word in enumerate(WORDS[:3])]
    for reply in constrained:
        end = await reply.wait()
        assert end["type"] == "end" and end["finish_reason"] == "stop", end
        value = json.loads(reply.streamed or end["message"]["content"])
        assert isinstance(value["city"], str) and isinstance(value["people"], int)
    for word, reply in zip(WORDS, free, strict=False):
        end = await reply.wait()
        assert end["usage"]["completion_tokens"] == 40 and reply.streamed.count(word) >= 4
        assert "{" not in reply.streamed


async def test_a_kill_mid_batch_fails_what_had_streamed_and_replays_the_rest(process: LlamaCppProcess) -> None:
    streamed = [Reply(process, f"s{i}", _repeat(word, 400)) for i, word in enumerate(WORDS[:4])]
    quiet = [Reply(process, f"q{i}", {**_repeat(word, 30), "stream": False}) for i, word in enumerate(WORDS[4:])]
    await _wait_for(lambda: len(process._computing) == 8 and all(r.streamed for r in streamed), 60,
                    "all eight in the batch, four of them streaming")
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for reply in streamed:
        end = await reply.wait(30)
        assert end["type"] == "error" and end["error"]["code"] == "executor_lost"
    for word, reply in zip(WORDS[4:], quiet, strict=True):
        end = await reply.wait(120)
        assert end["type"] == "end" and end["usage"]["completion_tokens"] == 30, end
        assert word in end["text"]
    assert process.pid != pid and process.state == "online"


def test_a_follow_up_prompt_reuses_the_cached_prefix_and_answers_as_if_computed_afresh(model_path: Path) -> None:
    from llama_cpp import Llama

    from node_agent.runtimes.batching import Engine, Generation

    host = Llama(model_path=str(model_path), n_ctx=256, verbose=False)
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "top_k": 0, "repeat_penalty": 1.0,
              "frequency_penalty": 0.0, "presence_penalty": 0.0, "stop": [], "seed": None, "logit_bias": None,
              "grammar": None}
    first = host.tokenize(b"The capital of France is Paris. The capital of Italy is", add_bos=True)
    follow = first + host.tokenize(b" Rome. The capital of Spain is", add_bos=False)
    engines = [Engine(host, n_ctx=512, parallel=4, threads=2) for _ in range(2)]
    try:
        def run(engine: Engine, tokens: list[int]) -> str:
            return "".join(engine.generate(Generation("r", tokens, dict(params), cancelled=lambda: False)))

        run(engines[0], first)
        assert engines[0].prompt_tokens_reused == 0
        reused = run(engines[0], follow)
        # The first prompt, and what was generated after it as far as the follow-up repeats it, is not computed again.
        assert engines[0].prompt_tokens_reused >= len(first)
        assert reused == run(engines[1], follow)  # the same answer as a fresh engine computing all of it
        # The same prompt again: all of it cached, its first token sampled from the logits kept for it (no
        # decode); the sampler sees exactly what it saw the first time, so a seed gives the same reply.
        params.update(temperature=0.9, seed=42, max_tokens=12)
        story = host.tokenize(b"Once upon a time, in a small village,", add_bos=True)
        before = engines[1].prompt_tokens_reused
        computed = run(engines[1], story)
        assert engines[1].prompt_tokens_reused == before, "new to this engine: computed"
        assert run(engines[1], story) == computed
        assert engines[1].prompt_tokens_reused - before == len(story)
    finally:
        for engine in engines:
            engine.stop()


def test_an_engine_that_fails_says_so_to_its_waiting_replies_and_to_the_worker(model_path: Path) -> None:
    import threading

    from llama_cpp import Llama

    from node_agent.runtimes.batching import Engine, EngineError, Generation

    host = Llama(model_path=str(model_path), n_ctx=256, verbose=False)
    failed = threading.Event()
    engine = Engine(host, n_ctx=512, parallel=2, threads=1, on_failure=failed.set)
    # Settings without their stop strings break the engine's own loop (not one request's sampler): the
    # worker's callback ends the process, as a crash would, so its requests are replayed on a new one.
    broken = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "top_k": 0, "repeat_penalty": 1.0,
              "frequency_penalty": 0.0, "presence_penalty": 0.0, "seed": None, "logit_bias": None, "grammar": None}
    with pytest.raises(EngineError):
        list(engine.generate(Generation("x", host.tokenize(b"Hello", add_bos=True), broken, cancelled=lambda: False)))
    assert failed.wait(5) and not engine.alive()
    with pytest.raises(EngineError):
        engine.submit(Generation("y", [1, 2], broken, cancelled=lambda: False))
