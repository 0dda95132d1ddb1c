"""Continuous batching: many replies generated together by one llama.cpp context.

The worker's request threads each hand a prompt to the `Engine` and read text back from their
`Generation`; one engine thread runs the model. Each running reply has its own sequence of the
key-value cache (a slot), so every step decodes one new token of every running reply in one
`llama_decode` call, and a new request's prompt joins the batch between tokens (its prompt is
evaluated in the same call as the others' next tokens). A reply that ends, or is cancelled, leaves
at once and its slot takes the next one waiting. On a CPU a step of eight sequences costs little
more than a step of one (the weights are read once per step either way), and on a GPU far less.

Per reply: its own sampler chain (logit bias, penalties, grammar, top-k, top-p, min-p, temperature,
seed: the chain llama-cpp-python's `Llama` builds, so settings mean what they meant), its stop
strings, its UTF-8 reassembly, its max_tokens, exact token counts. A free slot keeps what it
computed last, and a new prompt goes to the slot holding its longest prefix (a conversation's next
turn, a shared system prompt), which is then not computed again. A slot also keeps the logits its last
prompt ended with: the same prompt again (a retry, "regenerate", each of n choices) samples its first token
from them at once, with no decode at all.

Built on llama-cpp-python's low-level API (its ctypes bindings of llama.h). bench/README.md
("Many users at once") measures it against llama.cpp's own server.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Every wait of a request thread on its reply wakes at least this often to see whether the engine is alive.
WAIT_TICK_S = 1.0
# Prompt tokens evaluated per step beside the running replies' next tokens: big enough that a long prompt
# is read at full speed, small enough that the running replies are not held up for long.
PROMPT_CHUNK = 512
# Tokens of earlier output the repeat, frequency and presence penalties look back on (as llama-cpp-python).
PENALTY_LAST_N = 64
_DONE = object()


class EngineError(Exception):
    """The engine could not compute a reply (llama_decode failed); the request fails, the process goes on."""


@dataclass
class Generation:
    """One reply being generated: text pieces arrive on `pieces()`; `finish` and `completion_tokens` once done.

    `finish` is stop (end of text or a stop string), length (max_tokens), or cancelled.
    """

    rid: str
    prompt: list[int]
    params: dict[str, Any]
    cancelled: Callable[[], bool]
    isolate: bool = False  # run alone in the batch (a request replayed after a crash)
    on_begin: Callable[[], None] | None = None  # called when it joins the batch
    finish: str = "stop"
    completion_tokens: int = 0
    error: str = ""
    _queue: collections.deque[Any] = field(default_factory=collections.deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)

    def put(self, item: Any) -> None:
        with self._ready:
            self._queue.append(item)
            self._ready.notify()

    def pieces(self, alive: Callable[[], bool]) -> Iterator[str]:
        """The reply's text as it is made; returns when it is done (raises EngineError if it failed)."""
        while True:
            with self._ready:
                while not self._queue:
                    if not alive():
                        raise EngineError("the engine stopped")
                    self._ready.wait(WAIT_TICK_S)
                batch = list(self._queue)
                self._queue.clear()
            for item in batch:
                if item is _DONE:
                    if self.error:
                        raise EngineError(self.error)
                    return
                yield item


class _Slot:
    """One sequence of the key-value cache: the tokens it holds, and the reply it is generating (if any)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []  # tokens whose keys and values are in the cache, positions 0..n-1
        self.used_at = 0.0
        # The logits after the last prompt this slot computed (its length, and a copy of them): what a
        # prompt that is exactly cached[:length] samples its first token from.
        self.prompt_logits: tuple[int, Any] | None = None
        self.reset()

    def reset(self) -> None:
        self.gen: Generation | None = None
        self.sampler: Any = None
        self.todo: list[int] = []  # tokens to evaluate: the rest of the prompt, or the last sampled token
        self.logits_at = -1  # where this slot's logits are in the batch just decoded
        self.logits_saved: Any = None  # or its first token is sampled from these (the prompt was all cached)
        self.sampled = 0
        self.text = ""  # decoded text not yet sent: it might be the start of a stop string
        self.decoder: Any = None


class Engine:
    """One llama.cpp context with `parallel` sequences of `n_ctx` tokens each, run by one thread."""

    def __init__(self, llm: Any, *, n_ctx: int, parallel: int, threads: int, flash_attn: bool = True,
                 on_failure: Callable[[], None] | None = None) -> None:
        import llama_cpp as ll

        self.ll = ll
        self.llm = llm
        self.n_ctx = n_ctx
        self.parallel = parallel
        model = llm._model.model
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self._token_ids = np.arange(self.n_vocab, dtype=np.int32)  # the candidates' ids, for _sample_saved
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx * parallel
        params.n_batch = PROMPT_CHUNK + parallel
        params.n_ubatch = params.n_batch
        params.n_seq_max = parallel
        params.n_threads = params.n_threads_batch = threads
        # One stream of n_ctx cells per sequence: a sequence attends to its own cells only.
        params.kv_unified = False
        params.embeddings = False
        params.no_perf = True
        _set_flash_attn(ll, params, flash_attn)
        self.ctx = ll.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"could not make a context of {parallel} sequences of {n_ctx} tokens")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(params.n_batch, 0, 1)
        self.slots = [_Slot(i) for i in range(parallel)]
        self._waiting: collections.deque[Generation] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._failed = ""
        self._on_failure = on_failure  # called if the engine thread fails (the worker exits: a crash, replayed)
        self._piece = ctypes.create_string_buffer(256)
        self.prompt_tokens_reused = 0  # prompt tokens found in a slot's cache, not computed again
        self.thread = threading.Thread(target=self._run, daemon=True, name="engine")
        self.thread.start()

    # -- the request threads' side ------------------------------------------------------------
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, gen: Generation) -> Generation:
        with self._lock:
            if self._failed:
                raise EngineError(self._failed)
            self._waiting.append(gen)
            self._lock.notify()
        return gen

    def generate(self, gen: Generation) -> Iterator[str]:
        """Run `gen` and yield its text; a reader that stops reading early cancels nothing (cancel by id)."""
        self.submit(gen)
        yield from gen.pieces(self.alive)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()

    # -- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self._running():
                        self._lock.wait(WAIT_TICK_S)
                    if self._stopping:
                        break
                    self._admit()
                self._step()
        except BaseException as exc:  # noqa: BLE001 - every waiting reply must learn it failed
            self._failed = f"{type(exc).__name__}: {exc}"
            print(f"batching engine failed: {self._failed}", file=sys.stderr)
            if self._on_failure is not None:
                self._on_failure()
        finally:
            for slot in self.slots:
                if slot.gen is not None:
                    self._end(slot, "stop", error="the engine stopped")
            with self._lock:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for gen in waiting:
                gen.error = "the engine stopped"
                gen.put(_DONE)

    def _running(self) -> bool:
        return any(slot.gen is not None for slot in self.slots)

    def _admit(self) -> None:
        """Give waiting replies free slots (under the lock), each the slot holding most of its prompt."""
        while self._waiting:
            running = [s for s in self.slots if s.gen is not None]
            if any(s.gen is not None and s.gen.isolate for s in running):
                return
            gen = self._waiting[0]
            if gen.isolate and running:
                return
            free = [s for s in self.slots if s.gen is None]
            if not free:
                return
            self._waiting.popleft()
            if gen.cancelled():
                gen.finish = "cancelled"
                gen.put(_DONE)
                continue
            slot = max(free, key=lambda s: (self._reusable(s, gen.prompt), -s.used_at))
            keep = self._reusable(slot, gen.prompt)
            saved = slot.prompt_logits[1] if keep == len(gen.prompt) and slot.prompt_logits else None
            self.ll.llama_memory_seq_rm(self.memory, slot.seq, keep, -1)
            del slot.cached[keep:]
            self.prompt_tokens_reused += keep
            slot.reset()
            slot.gen = gen
            slot.logits_saved = saved
            if gen.on_begin is not None:
                gen.on_begin()
            slot.todo = gen.prompt[keep:]
            if saved is None:
                slot.prompt_logits = None  # this slot's cache is about to hold another prompt
            slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                slot.sampler = self._sampler(gen.params)
            except Exception as exc:  # noqa: BLE001 - a sampler this request cannot have fails it alone
                self._end(slot, "stop", error=f"cannot sample as asked: {exc}")

    def _reusable(self, slot: _Slot, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens `slot` holds already: all of them only if it kept their last logits
        (else at least the last one is evaluated again, for its logits)."""
        saved = slot.prompt_logits
        if saved is not None and saved[0] == len(prompt) and slot.cached[:len(prompt)] == prompt:
            return len(prompt)
        return _common_prefix(slot.cached, prompt, len(prompt) - 1)

    def _step(self) -> None:
        """One llama_decode: every running reply's next token, and as much waiting prompt as fits."""
        ll, batch = self.ll, self.batch
        for slot in self.slots:
            if slot.gen is not None and slot.gen.cancelled():
                self._end(slot, "cancelled")
        for slot in self.slots:
            if slot.gen is not None and slot.logits_saved is not None:
                saved, slot.logits_saved = slot.logits_saved, None
                self._take(slot, self._sample_saved(slot.sampler, saved))
        running = [s for s in self.slots if s.gen is not None]
        if not running:
            return
        batch.n_tokens = 0
        room = PROMPT_CHUNK + self.parallel
        # Replies already generating first (one token each), then prompts, oldest first, in what room is left.
        for slot in sorted(running, key=lambda s: (len(s.todo) > 1 or not s.sampled, s.used_at)):
            take = slot.todo[:max(room, 0)]
            if not take:
                slot.logits_at = -1
                continue
            start = len(slot.cached)
            for i, token in enumerate(take):
                n = batch.n_tokens
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq
                batch.logits[n] = False
                batch.n_tokens = n + 1
            done = len(take) == len(slot.todo)
            if done:
                batch.logits[batch.n_tokens - 1] = True
            slot.logits_at = batch.n_tokens - 1 if done else -1
            slot.cached.extend(take)
            del slot.todo[:len(take)]
            room -= len(take)
        result = ll.llama_decode(self.ctx, batch)
        if result != 0:
            # 1: no room in the cache (cannot happen with a stream per sequence); <0: the backend failed.
            for slot in running:
                if slot.gen is not None:
                    self._drop_cached(slot)
                    self._end(slot, "stop", error=f"llama_decode returned {result}")
            return
        now = time.monotonic()
        for slot in running:
            if slot.gen is None or slot.logits_at < 0:
                continue
            slot.used_at = now
            if not slot.sampled:  # the prompt's last logits: kept for the same prompt again
                logits = ll.llama_get_logits_ith(self.ctx, slot.logits_at)
                slot.prompt_logits = (len(slot.cached), np.ctypeslib.as_array(logits, (self.n_vocab,)).copy())
            token = ll.llama_sampler_sample(slot.sampler, self.ctx, slot.logits_at)
            self._take(slot, token)

    def _take(self, slot: _Slot, token: int) -> None:
        """What one sampled token does to its reply: ends it, or adds its text."""
        gen = slot.gen
        assert gen is not None
        if self.ll.llama_vocab_is_eog(self.vocab, token):
            self._end(slot, "stop")
            return
        slot.sampled += 1
        text = slot.decoder.decode(self._token_bytes(token))
        stops = gen.params["stop"]
        if stops and text:
            slot.text += text
            cut = min((i for i in (slot.text.find(s) for s in stops if s) if i >= 0), default=-1)
            if cut >= 0:
                if cut:
                    gen.put(slot.text[:cut])
                slot.text = ""
                self._end(slot, "stop")
                return
            # Hold back the end that could be the beginning of a stop string.
            hold = max((k for s in stops for k in range(min(len(s) - 1, len(slot.text)), 0, -1)
                        if slot.text.endswith(s[:k])), default=0)
            if len(slot.text) > hold:
                gen.put(slot.text[:len(slot.text) - hold])
                slot.text = slot.text[len(slot.text) - hold:]
        elif text:
            gen.put(text)
        if slot.sampled >= gen.params["max_tokens"]:
            self._end(slot, "length")
            return
        slot.todo = [token]

    def _end(self, slot: _Slot, finish: str, *, error: str = "") -> None:
        gen = slot.gen
        assert gen is not None
        if slot.decoder is not None and finish != "cancelled":
            rest = slot.text + slot.decoder.decode(b"", final=True)
            if rest:
                gen.put(rest)
        gen.finish = finish
        gen.completion_tokens = slot.sampled
        gen.error = error
        if slot.sampler is not None:
            self.ll.llama_sampler_free(slot.sampler)
        slot.reset()
        gen.put(_DONE)

    def _drop_cached(self, slot: _Slot) -> None:
        self.ll.llama_memory_seq_rm(self.memory, slot.seq, 0, -1)
        slot.cached.clear()
        slot.prompt_logits = None

    def _sample_saved(self, sampler: Any, logits: Any) -> int:
        """What llama_sampler_sample does, from kept logits instead of the context's."""
        ll = self.ll
        candidates = np.empty(self.n_vocab, dtype=_TOKEN_DATA)
        candidates["id"] = self._token_ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = ll.llama_token_data_array(
            data=candidates.ctypes.data_as(ctypes.POINTER(ll.llama_token_data)), size=self.n_vocab, selected=-1,
            sorted=False)
        ll.llama_sampler_apply(sampler, ctypes.byref(array))
        token = int(array.data[array.selected].id)
        ll.llama_sampler_accept(sampler, token)
        return token

    def _token_bytes(self, token: int) -> bytes:
        n = self.ll.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:  # a longer piece than the buffer: grow it and ask again
            self._piece = ctypes.create_string_buffer(-n)
            n = self.ll.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def _sampler(self, params: dict[str, Any]) -> Any:
        """The chain llama-cpp-python's Llama builds for these settings (and the logit bias it applies first)."""
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        try:
            bias = params.get("logit_bias")
            if bias:
                entries = (ll.llama_logit_bias * len(bias))(*(ll.llama_logit_bias(t, b) for t, b in bias.items()))
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(self.n_vocab, len(bias), entries))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, params["repeat_penalty"], params["frequency_penalty"],
                params["presence_penalty"]))
            grammar = params.get("grammar")
            if grammar is not None:
                sampler = ll.llama_sampler_init_grammar(self.vocab, grammar._grammar.encode(), grammar._root.encode())
                if not sampler:
                    raise ValueError("the grammar does not compile")
                ll.llama_sampler_chain_add(chain, sampler)
            temperature = params["temperature"]
            seed = params.get("seed")
            if seed is None:  # a sampling seed, not a secret: the reply only has to differ from the last
                seed = random.randrange(2**32 - 1)  # nosec B311
            seed = int(seed) & 0xFFFFFFFF
            if temperature == 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            else:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params["top_k"]))
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params["top_p"], 1))
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(params["min_p"], 1))
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(temperature))
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        except BaseException:
            ll.llama_sampler_free(chain)
            raise
        return chain


# llama_token_data as numpy lays it out (id, logit, p): the candidates of one sampling.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b[:limit], strict=False):
        if x != y:
            break
        n += 1
    return n


def _set_flash_attn(ll: Any, params: Any, on: bool) -> None:
    """Flash attention on (llama.cpp's own default where the backend has it; llama-cpp-python leaves it off)."""
    names = {name for name, _ in params._fields_}
    if "flash_attn_type" in names:
        params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_AUTO if on else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    elif "flash_attn" in names:
        params.flash_attn = on
