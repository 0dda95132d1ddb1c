"""One inference process: a llama.cpp model behind a pipe, serving up to --parallel requests at once.

Run as `python -m node_agent.runtimes.llama_cpp_worker --model PATH ...` by the
node agent, never by hand. It opens no port: requests arrive as JSON lines on
stdin and events leave as JSON lines on stdout, so nothing but its parent can
reach it, and it costs a fraction of an HTTP server's work per request
(bench/README.md, backbone.py).

Input frames (node_agent.protocol.pipe_frame: a length line, then that many bytes of JSON):
              {"op": "chat"|"completion"|"embedding", "id": ID, "stream": bool, "body": {...}}
              (with "isolate": true, the request runs alone in the batch: a replay after a crash)
              {"op": "tokenize", "id": ID, "body": {"messages": [...]}} (answered at once, between tokens)
              {"op": "cancel", "id": ID}
              The body is the client's JSON as sent (whitespace and newlines included): framed by
              length, no byte of it can begin a request of its own.
Output lines: {"type": "ready", ...} once the model is loaded, then per request
              {"type": "begin", "id": ID} when its computation starts (for the agent alone),
              zero or more {"type": "delta", "id": ID, ...}, then exactly one
              {"type": "end", "id": ID, ...} or {"type": "error", "id": ID, "error": {...}}.

Requests run on threads of their own, up to --parallel at once; their replies are generated together
by the batching engine (node_agent/runtimes/batching.py), so events of different requests interleave.

The output lines are the node link's wire format: the agent forwards them to the
gateway unchanged, so a token costs one JSON encode on the whole way out.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, BinaryIO

from node_agent.protocol import (
    OP_CANCEL,
    OP_CHAT,
    OP_COMPLETION,
    OP_EMBEDDING,
    OP_TOKENIZE,
    PIPE_FRAME_MAX_BYTES,
    error_event,
)
from node_agent.runtimes.batching import Engine, EngineError, Generation

# A request cancelled while queued or generating: the generating loop polls
# this set between tokens, which is what bounds cancellation to one token.
_cancelled: set[str] = set()
_cancelled_lock = threading.Lock()
_parent_gone = threading.Event()  # stdin closed: the agent stopped or died; stop generating at once


# The window of the loading context, which only tokenizes (the engine's context does the work).
HOST_CONTEXT_TOKENS = 256
MAX_CHOICES = 8  # n: choices per request, made one after another
# Every chat template spends at least this many tokens on a turn (role markers and an end).
MIN_TOKENS_PER_TURN = 2


class RequestError(Exception):
    """A request the model cannot serve as asked: reported to the client as a 400 (with `code`, if given)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def _is_cancelled(rid: str) -> bool:
    if _parent_gone.is_set():
        return True  # nobody is left to read the reply
    with _cancelled_lock:
        return rid in _cancelled


class Output:
    """Writes protocol lines to the pipe the parent reads; one lock so lines never interleave."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]


class Worker:
    def __init__(self, args: argparse.Namespace, out: Output) -> None:
        from llama_cpp import Llama

        self.args = args
        self.out = out
        self.n_ctx = args.n_ctx  # the window of one request (each has a sequence of this many tokens)
        self._local = threading.local()  # per request thread: which of its n choices is being made
        self._embedder: Any = None
        self._embed_lock = threading.Lock()  # one embedding context, used by one request at a time
        self.engine: Engine | None = None
        if args.embedding:
            # An embedding model: one context, in embedding mode, and no chat.
            self.llm = self._embedder = self._embedding_context(args.n_ctx)
            self.n_ctx = self.llm.n_ctx()
            self.formatter = None
            self.template_knows_tools = False
            return
        # Loads the weights, and tokenizes and renders templates; its own small context goes unused; the
        # engine's context (a sequence of n_ctx tokens per parallel request) shares the weights.
        self.llm = Llama(
            model_path=args.model,
            n_ctx=HOST_CONTEXT_TOKENS,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_gpu_layers=args.n_gpu_layers,
            chat_format=args.chat_format,
            verbose=False,
        )
        # An engine that fails has lost its model: the process ends as a crash would, so the agent starts a new
        # one and replays what had not been answered.
        self.engine = Engine(self.llm, n_ctx=args.n_ctx, parallel=args.parallel, threads=args.threads,
                             on_failure=lambda: os._exit(70))
        self.formatter = self._make_formatter()
        template = self.llm.metadata.get("tokenizer.chat_template") or ""
        # A template that renders `tools` tells the model about them itself; for the
        # others (SmolLM2's, the built-in formats) we describe them in the system turn.
        self.template_knows_tools = not self.args.chat_format and "tools" in template

    @property
    def _choice(self) -> int:
        return getattr(self._local, "choice", 0)

    @_choice.setter
    def _choice(self, index: int) -> None:
        self._local.choice = index

    # -- set-up -----------------------------------------------------------
    def _make_formatter(self) -> Any:
        """The chat template as a callable that returns the prompt, so we can count its tokens."""
        from llama_cpp import llama_chat_format

        if self.args.chat_format:
            formatter = getattr(llama_chat_format, "format_" + self.args.chat_format.replace("-", "_"), None)
            if formatter is None:
                raise SystemExit(f"unknown chat format {self.args.chat_format!r}")
            return formatter
        metadata = self.llm.metadata
        template = metadata.get("tokenizer.chat_template")
        if not template:
            # Base models ship no template; gemma's own turn markers suit its family, ChatML the rest.
            if str(metadata.get("general.architecture", "")).startswith("gemma"):
                return llama_chat_format.format_gemma
            return llama_chat_format.format_chatml
        model = self.llm._model

        def token_text(key: str) -> str:
            token_id = metadata.get(key)
            return model.token_get_text(int(token_id)) if token_id is not None else ""

        eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
            stop_token_ids=[int(eos_id)] if eos_id is not None else None,
        )

    def embedder(self) -> Any:
        """A second context on the same mmapped weights, in embedding mode, made on first use."""
        if self._embedder is None:
            self._embedder = self._embedding_context(min(self.args.n_ctx, 2048))
        return self._embedder

    def _embedding_context(self, n_ctx: int) -> Any:
        import llama_cpp

        return llama_cpp.Llama(
            model_path=self.args.model,
            n_ctx=n_ctx,
            n_threads=self.args.threads,
            n_threads_batch=self.args.threads,
            n_gpu_layers=self.args.n_gpu_layers,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            verbose=False,
        )

    # -- dispatch ---------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> None:
        rid = request["id"]
        self._choice = 0
        self._local.isolate = bool(request.get("isolate"))
        try:
            if _is_cancelled(rid):
                self.out.send({"type": "end", "id": rid, "finish_reason": "cancelled"})
                return
            op = request.get("op")
            if self.args.embedding and op != OP_EMBEDDING:
                raise RequestError("this model serves embeddings only; use /v1/embeddings")
            if op == OP_CHAT:
                self.chat(rid, request["body"], bool(request.get("stream")))
            elif op == OP_COMPLETION:
                self.completion(rid, request["body"], bool(request.get("stream")))
            elif op == OP_EMBEDDING:
                self.embedding(rid, request["body"])
            else:
                raise RequestError(f"unknown operation {op!r}")
        except RequestError as exc:
            self.out.send(_error(rid, str(exc), "invalid_request_error", 400, code=exc.code))
        except ValueError as exc:
            # llama-cpp-python reports requests that do not fit (prompt longer than
            # the context window, a bad grammar) as ValueError.
            self.out.send(_error(rid, str(exc), "invalid_request_error", 400))
        except EngineError as exc:
            print(f"request {rid} failed in the engine: {exc}", file=sys.stderr)
            self.out.send(_error(rid, "The model failed to process this request.", "server_error", 500,
                                 code="inference_failed"))
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the process
            # The details stay in the node's log: the client learns only that this request failed here.
            print(f"request {rid} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.out.send(_error(rid, "The model failed to process this request.", "server_error", 500,
                                 code="inference_failed"))
        finally:
            with _cancelled_lock:
                _cancelled.discard(rid)

    # -- sampling ---------------------------------------------------------
    def _sampling(self, body: dict[str, Any], n_prompt: int) -> dict[str, Any]:
        room = self.n_ctx - n_prompt
        if room <= 0:
            raise RequestError(
                f"the prompt is {n_prompt} tokens, which fills this model's context window of "
                f"{self.n_ctx} tokens", code="context_length_exceeded")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        max_tokens = room if max_tokens is None else min(int(max_tokens), room)
        if self.args.max_tokens_cap:
            max_tokens = min(max_tokens, self.args.max_tokens_cap)
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        logit_bias = body.get("logit_bias") or None
        if logit_bias:
            logit_bias = {int(k): float(v) for k, v in logit_bias.items()}
            _check_token_ids(logit_bias, self.llm.n_vocab(), "logit_bias")
        params: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": _float(body, "temperature", 1.0),
            "top_p": _float(body, "top_p", 1.0),
            "min_p": _float(body, "min_p", 0.0),
            "top_k": int(body.get("top_k") or 0),
            "repeat_penalty": _float(body, "repeat_penalty", 1.0),
            "frequency_penalty": _float(body, "frequency_penalty", 0.0),
            "presence_penalty": _float(body, "presence_penalty", 0.0),
            "stop": list(stop),
            "seed": body.get("seed"),
            "logit_bias": logit_bias,
        }
        return params

    def _generate(self, rid: str, prompt: list[int], params: dict[str, Any]) -> tuple[Generation, Iterator[str]]:
        """The reply in the making (finish and token count once done), and its text pieces as they come.

        The engine decodes it in one batch with the other requests running, and ends it at the next token once
        it is cancelled or has its max_tokens.
        """
        if not prompt:
            raise RequestError("the prompt is empty")
        assert self.engine is not None, "a chat model has an engine"
        gen = Generation(rid, prompt, params, cancelled=lambda: _is_cancelled(rid),
                         isolate=getattr(self._local, "isolate", False),
                         on_begin=lambda: self.out.send({"type": "begin", "id": rid}))
        return gen, self.engine.generate(gen)

    def _coalesced(self, pieces: Iterator[str]) -> Iterator[str]:
        """Join the pieces made within --stream-interval-ms of the last one sent; the first goes at once.

        Every message wakes the agent, the gateway and the client, and on a machine
        whose cores all run llama.cpp each wake-up stalls a generating thread.
        """
        interval = self.args.stream_interval_ms / 1000
        if interval <= 0:
            yield from pieces
            return
        pending: list[str] = []
        last = 0.0
        for piece in pieces:
            pending.append(piece)
            now = time.monotonic()
            if now - last >= interval:
                yield "".join(pending)
                pending, last = [], now
        if pending:
            yield "".join(pending)

    # -- chat -------------------------------------------------------------
    def chat(self, rid: str, body: dict[str, Any], stream: bool) -> None:
        raw_messages = body.get("messages") or []
        if len(raw_messages) * MIN_TOKENS_PER_TURN > self.n_ctx:
            # Refused before the template renders them all: that alone can take seconds.
            raise RequestError(f"{len(raw_messages)} messages cannot fit this model's context window of "
                               f"{self.n_ctx} tokens")
        messages = [_normalize_message(m) for m in raw_messages]
        tools = body.get("tools") or None
        tool_choice = body.get("tool_choice")
        if tools and tool_choice is None:
            tool_choice = "auto"
        if tool_choice == "none":
            tools = None
        forced = _forced_tool(tools, tool_choice)
        grammar = None
        if forced is not None:
            grammar = _grammar(json.dumps(forced["schema"], sort_keys=True))
        else:
            grammar = _response_format_grammar(body.get("response_format"))
        assert self.formatter is not None, "a chat model has a formatter"

        def rendered(turns: list[dict[str, Any]]) -> tuple[Any, list[int]]:
            if tools and not self.template_knows_tools:
                turns = _with_tool_instructions(turns, tools)
            assert self.formatter is not None
            formatted = self.formatter(messages=turns, tools=tools, tool_choice=tool_choice if tools else None)
            return formatted, self.llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special,
                                                special=True)

        formatted, prompt = rendered(messages)
        if body.get("truncation") == "auto":
            # OptimaGPT's extension (the Responses API's truncation): the oldest turns go until the prompt leaves
            # room for the reply asked for (at most half the window), the system turns and the last turn stay.
            wanted = min(int(body.get("max_completion_tokens") or body.get("max_tokens") or 1), self.n_ctx // 2)
            while len(prompt) + wanted > self.n_ctx:
                shorter = _without_oldest_turn(messages)
                if shorter is None:
                    break
                messages = shorter
                formatted, prompt = rendered(messages)
        params = self._sampling(body, len(prompt))
        if formatted.stop:
            extra = [formatted.stop] if isinstance(formatted.stop, str) else list(formatted.stop)
            params["stop"] = params["stop"] + extra
        params["grammar"] = grammar

        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for index in self._each_choice(body, params):
            gen, pieces = self._generate(rid, prompt, params)
            if stream:
                pieces = self._coalesced(pieces)
            if forced is not None:
                message = self._forced_tool_call(rid, forced, pieces, stream)
            elif tools and tool_choice == "auto":
                message = self._auto_tools(rid, pieces, stream)
            else:
                message = self._plain(rid, pieces, stream)
            finish = gen.finish
            if message.get("tool_calls") and finish == "stop" and not (forced and forced["named"]):
                finish = "tool_calls"
            completion_tokens += gen.completion_tokens
            choices.append({"index": index, "finish_reason": finish, **({} if stream else {"message": message})})
            if finish == "cancelled":
                break
        self._end(rid, choices, _usage(len(prompt), completion_tokens), "message")

    def _each_choice(self, body: dict[str, Any], params: dict[str, Any]) -> Iterator[int]:
        """The indexes of the `n` choices asked for, one after another; with a seed, choice i uses seed + i
        (n choices from one seed must still differ)."""
        n = body.get("n") or 1
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
            raise RequestError(f"n must be an integer from 1 to {MAX_CHOICES}")
        seed = params.get("seed")
        for index in range(n):
            self._choice = index
            if index and seed is not None:
                params["seed"] = seed + index
            yield index

    def _delta(self, rid: str, fields: dict[str, Any]) -> None:
        """A piece of choice `self._choice`'s reply; the index is said only when there are several choices."""
        event = {"type": "delta", "id": rid, **fields}
        if self._choice:
            event["index"] = self._choice
        self.out.send(event)

    def _end(self, rid: str, choices: list[dict[str, Any]], usage: dict[str, int], field: str) -> None:
        """The end event: one choice's `field` and finish_reason at the top (as before n existed), several in
        `choices`."""
        end: dict[str, Any] = {"type": "end", "id": rid, "finish_reason": choices[0]["finish_reason"], "usage": usage}
        if len(choices) > 1:
            end["choices"] = choices
        elif field in choices[0]:
            end[field] = choices[0][field]
        self.out.send(end)

    def _plain(self, rid: str, pieces: Iterator[str], stream: bool) -> dict[str, Any]:
        text = []
        for piece in pieces:
            text.append(piece)
            if stream:
                self._delta(rid, {"delta": {"content": piece}})
        return {"role": "assistant", "content": "".join(text)}

    def _forced_tool_call(
        self, rid: str, forced: dict[str, Any], pieces: Iterator[str], stream: bool
    ) -> dict[str, Any]:
        call_id = "call_" + uuid.uuid4().hex[:24]
        if forced["named"]:
            # The name is known before the first token, so arguments stream as they come.
            name = forced["name"]
            if stream:
                self._delta(rid, {"delta": {"tool_calls": [_tool_call_head(call_id, name)]}})
            args = []
            for piece in pieces:
                args.append(piece)
                if stream:
                    self._delta(rid, {"delta": {"tool_calls": [_tool_call_args(piece)]}})
            arguments = "".join(args)
        else:
            text = "".join(pieces)
            try:
                call = json.loads(text)
                name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
            except (ValueError, KeyError, TypeError):
                name, arguments = forced["names"][0], text
            if stream:
                self._delta(rid, {"delta": {"tool_calls": [_tool_call_head(call_id, name)]}})
                self._delta(rid, {"delta": {"tool_calls": [_tool_call_args(arguments)]}})
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def _auto_tools(self, rid: str, pieces: Iterator[str], stream: bool) -> dict[str, Any]:
        """Stream text unless the reply opens like a tool call; then hold it back and parse it at the end."""
        held: list[str] = []
        mode = "undecided"
        for piece in pieces:
            if mode == "text":
                held.append(piece)
                if stream:
                    self._delta(rid, {"delta": {"content": piece}})
                continue
            held.append(piece)
            head = "".join(held).lstrip()
            if not head:
                continue
            if head.startswith(("<tool_call>", "{")):
                mode = "tool"
            elif mode == "undecided" and not "<tool_call>".startswith(head):
                mode = "text"
                if stream:
                    self._delta(rid, {"delta": {"content": "".join(held)}})
        text = "".join(held)
        call = _parse_tool_call(text) if mode == "tool" else None
        if call is None:
            if stream and mode != "text" and text:
                self._delta(rid, {"delta": {"content": text}})
            return {"role": "assistant", "content": text}
        call_id = "call_" + uuid.uuid4().hex[:24]
        if stream:
            self._delta(rid, {"delta": {"tool_calls": [_tool_call_head(call_id, call[0])]}})
            self._delta(rid, {"delta": {"tool_calls": [_tool_call_args(call[1])]}})
        tool_call = {"id": call_id, "type": "function", "function": {"name": call[0], "arguments": call[1]}}
        return {"role": "assistant", "content": None, "tool_calls": [tool_call]}

    # -- legacy completions -----------------------------------------------
    def completion(self, rid: str, body: dict[str, Any], stream: bool) -> None:
        prompt_in = body.get("prompt", "")
        if isinstance(prompt_in, list):
            if len(prompt_in) != 1 or not isinstance(prompt_in[0], str):
                raise RequestError("prompt must be a string or a list of one string")
            prompt_in = prompt_in[0]
        prompt = self.llm.tokenize(str(prompt_in).encode(), add_bos=True, special=False)
        params = self._sampling(body, len(prompt))
        params["grammar"] = _response_format_grammar(body.get("response_format"))
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for index in self._each_choice(body, params):
            text = []
            if body.get("echo"):
                text.append(str(prompt_in))
                if stream:
                    self._delta(rid, {"text": str(prompt_in)})
            gen, pieces = self._generate(rid, prompt, params)
            for piece in self._coalesced(pieces) if stream else pieces:
                text.append(piece)
                if stream:
                    self._delta(rid, {"text": piece})
            completion_tokens += gen.completion_tokens
            choices.append({"index": index, "finish_reason": gen.finish,
                            **({} if stream else {"text": "".join(text)})})
            if gen.finish == "cancelled":
                break
        self._end(rid, choices, _usage(len(prompt), completion_tokens), "text")

    # -- token counts -----------------------------------------------------
    def tokenize(self, rid: str, body: dict[str, Any]) -> None:
        """How many tokens of the context window each part of a chat takes, by the model's own tokenizer.

        Runs on the reader thread, beside a generation: tokenizing reads only the vocabulary and the
        template renders in Python, neither touches the context the generating thread uses.
        """
        try:
            if self.args.embedding:
                raise RequestError("this model serves embeddings only")
            messages = [_normalize_message(m) for m in body.get("messages") or []]
            tools = body.get("tools") or None
            counts = {"system": 0, "tools": 0, "user": 0, "assistant": 0}
            for message in messages:
                text = message.get("content")
                if isinstance(text, str) and text:
                    role = message.get("role")
                    part = "system" if role in ("system", "developer") else "assistant" if role == "assistant" \
                        else "tools" if role == "tool" else "user"
                    counts[part] += len(self.llm.tokenize(text.encode(), add_bos=False, special=False))
            if tools:
                counts["tools"] += len(self.llm.tokenize(json.dumps(tools).encode(), add_bos=False, special=False))
            if tools and not self.template_knows_tools:
                messages = _with_tool_instructions(messages, tools)
            assert self.formatter is not None, "a chat model has a formatter"
            formatted = self.formatter(messages=messages, tools=tools, tool_choice="auto" if tools else None)
            prompt = self.llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
            # What the template adds around the messages (turn markers, the reply's opening) is the rest.
            counts["template"] = max(len(prompt) - sum(counts.values()), 0)
            self.out.send({"type": "end", "id": rid, "finish_reason": "stop",
                           "counts": {**counts, "prompt": len(prompt), "window": self.n_ctx}})
        except (RequestError, ValueError) as exc:
            self.out.send(_error(rid, str(exc), "invalid_request_error", 400))
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the process
            print(f"tokenizing {rid} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.out.send(_error(rid, "The model failed to count these tokens.", "server_error", 500,
                                 code="inference_failed"))

    # -- embeddings -------------------------------------------------------
    def embedding(self, rid: str, body: dict[str, Any]) -> None:
        with self._embed_lock:  # requests run on threads of their own; the embedding context is one
            self._embedding(rid, body)

    def _embedding(self, rid: str, body: dict[str, Any]) -> None:
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise RequestError("input must be a non-empty string, list of strings, or list of token lists")
        embedder = self.embedder()
        for item in inputs:
            if not isinstance(item, str):
                # llama.cpp aborts the whole process on a token id outside the vocabulary.
                _check_token_ids(item, embedder.n_vocab(), "input")
        vectors = []
        prompt_tokens = 0
        for item in inputs:
            if _is_cancelled(rid):
                self.out.send({"type": "end", "id": rid, "finish_reason": "cancelled"})
                return
            if isinstance(item, str):
                given = len(embedder.tokenize(item.encode(), add_bos=False, special=False))
            else:
                given = len(item)
                item = embedder.detokenize([int(t) for t in item]).decode("utf-8", errors="replace")
            tokens = embedder.tokenize(item.encode(), add_bos=True, special=False)
            if len(tokens) > embedder.n_ctx():
                raise RequestError(
                    f"an input is {len(tokens)} tokens, more than this model's embedding window of {embedder.n_ctx()}"
                )
            if not item.strip():
                raise RequestError("an input has no text to embed (its tokens make no text)")
            # As OpenAI counts: the tokens of the inputs themselves, not what the model adds around them.
            prompt_tokens += given
            vectors.append(embedder.embed(item, normalize=True))
        self.out.send(
            {
                "type": "end",
                "id": rid,
                "finish_reason": "stop",
                "embeddings": vectors,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )


# -- helpers ---------------------------------------------------------------
def _check_token_ids(ids: Any, n_vocab: int, field: str) -> None:
    """RequestError unless every id is an integer token of this model's vocabulary."""
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < n_vocab:
            raise RequestError(f"{field} holds token id {token!r}, outside this model's vocabulary of {n_vocab} tokens")


def _error(rid: str, message: str, kind: str, status: int, code: str | None = None) -> dict[str, Any]:
    return error_event(rid, message, code=code, status=status, kind=kind)


def _float(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    return default if value is None else float(value)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_call_head(call_id: str, name: str) -> dict[str, Any]:
    return {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def _tool_call_args(fragment: str) -> dict[str, Any]:
    return {"index": 0, "function": {"arguments": fragment}}


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Turn OpenAI message shapes the chat templates do not know into plain text turns."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part["text"] for part in content
                          if isinstance(part, dict) and isinstance(part.get("text"), str))
    if message.get("role") == "assistant" and message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"] if isinstance(message["tool_calls"], list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise RequestError("each tool call must have a function with a name")
            calls.append(json.dumps({"name": function["name"], "arguments": _json_or_text(function.get("arguments"))}))
        content = (content or "") + "".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls)
    normalized = {"role": message.get("role", "user"), "content": content or ""}
    if message.get("name"):
        normalized["name"] = message["name"]
    return normalized


def _without_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation without its oldest turn (from the first message after the system ones up to the next user
    message: a tool call never loses its result, nor a result its call); None when only one turn is left."""
    start = 0
    while start < len(messages) and messages[start]["role"] in ("system", "developer"):
        start += 1
    following = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None)
    if following is None:
        return None
    return messages[:start] + messages[following:]


TOOL_INSTRUCTIONS = (
    "You can call the following tools. To call one, answer with nothing but "
    '<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>.\n'
    "Tools (JSON): {tools}"
)


def _with_tool_instructions(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tools described in its system turn (one is added if there is none)."""
    specs = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    instructions = TOOL_INSTRUCTIONS.format(tools=specs)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "role": "system", "content": f"{messages[0]['content']}\n\n{instructions}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


def _json_or_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _forced_tool(tools: list[dict[str, Any]] | None, tool_choice: Any) -> dict[str, Any] | None:
    """The grammar schema for a tool call the client requires, or None when the model may choose."""
    if not tools:
        return None
    functions: dict[str, Any] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
        functions[function["name"]] = function.get("parameters") or {"type": "object"}
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        if name not in functions:
            raise RequestError(f"tool_choice names function {name!r}, which is not among the tools")
        return {"named": True, "name": name, "schema": functions[name]}
    if tool_choice == "required":
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": schema},
                "required": ["name", "arguments"],
            }
            for name, schema in functions.items()
        ]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {"named": False, "names": list(functions), "schema": schema}
    return None


def _parse_tool_call(text: str) -> tuple[str, str] | None:
    body = text.strip()
    if body.startswith("<tool_call>"):
        body = body.removeprefix("<tool_call>").split("</tool_call>")[0].strip()
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


@lru_cache(maxsize=64)
def _grammar(schema_json: str) -> Any:
    """Compile a JSON schema to a grammar once per schema; compiling costs milliseconds."""
    from llama_cpp import llama_grammar

    try:
        gbnf = llama_grammar.json_schema_to_gbnf(schema_json)
        # llama-cpp-python's converter lets raw control characters into strings,
        # which is not JSON (a newline inside a name breaks json.loads); llama.cpp's
        # own converter excludes them, and so do we.
        gbnf = gbnf.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]', 1)
        return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)
    except Exception as exc:
        raise RequestError(f"cannot enforce this JSON schema: {exc}") from exc


@lru_cache(maxsize=1)
def _json_grammar() -> Any:
    from llama_cpp import llama_grammar

    return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)


def _response_format_grammar(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return _json_grammar()
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object")
        return _grammar(json.dumps(schema, sort_keys=True))
    return None


def _frames(stream: BinaryIO) -> Iterator[bytes]:
    """The payloads of the length-prefixed frames on `stream`, until it closes (or breaks the framing)."""
    while header := stream.readline(32):
        try:
            size = int(header)
        except ValueError:
            size = -1
        if not 0 <= size <= PIPE_FRAME_MAX_BYTES:
            # Only our agent writes here; a broken frame means the pipe cannot be trusted to resync.
            print(f"broken frame header {header[:32]!r} on the request pipe", file=sys.stderr)
            return
        payload = stream.read(size)
        if len(payload) < size:
            return
        yield payload


def _read_requests(inbox: queue.Queue[dict[str, Any] | None], worker: Worker) -> None:
    """Reader thread: cancellations and token counts take effect at once, everything else queues for the model."""
    for frame in _frames(sys.stdin.buffer):
        try:
            request = json.loads(frame)
        except ValueError:
            print("unreadable request frame on the request pipe", file=sys.stderr)
            continue
        if not isinstance(request, dict) or not isinstance(request.get("id"), str):
            continue
        if request.get("op") == OP_CANCEL:
            with _cancelled_lock:
                _cancelled.add(request["id"])
        elif request.get("op") == OP_TOKENIZE:
            worker.tokenize(request["id"], request.get("body") or {})
        else:
            inbox.put(request)
    _parent_gone.set()  # parent closed the pipe (it stopped, or was killed): drop everything and exit
    inbox.put(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node_agent.runtimes.llama_cpp_worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--chat-format", default=None)
    parser.add_argument("--max-tokens-cap", type=int, default=0)
    parser.add_argument("--stream-interval-ms", type=float, default=0.0)
    parser.add_argument("--parallel", type=int, default=1, help="requests decoded together, a sequence each")
    parser.add_argument("--embedding", action="store_true", help="load the model for embeddings only")
    args = parser.parse_args(argv)

    # The protocol owns the original stdout; anything native code prints goes to stderr.
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    out = Output(protocol_fd)
    worker = Worker(args, out)
    parallel = 1 if args.embedding else args.parallel
    out.send({"type": "ready", "pid": os.getpid(), "n_ctx": worker.n_ctx, "parallel": parallel})
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_requests, args=(inbox, worker), daemon=True, name="requests").start()
    # A thread per request being served (each renders its prompt, then reads its reply from the engine):
    # as many as the engine has sequences; later requests wait here, in order.
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="request") as pool:
        while (request := inbox.get()) is not None and not _parent_gone.is_set():
            pool.submit(_serve, worker, request)
        if worker.engine is not None:
            worker.engine.stop()
        pool.shutdown(wait=False, cancel_futures=True)
    return 0


def _serve(worker: Worker, request: dict[str, Any]) -> None:
    if _parent_gone.is_set():
        return
    if worker.engine is None or request.get("op") == OP_EMBEDDING:
        # Tells the agent which requests a crash from here on could be blamed on (each replayed once, then
        # failed); a generation says so when it joins the engine's batch.
        worker.out.send({"type": "begin", "id": request["id"]})
    worker.handle(request)


if __name__ == "__main__":
    sys.exit(main())
