"""Simulated nodes: the agent's own link code in front of model stand-ins that answer at a chosen speed.

    python -m node_agent.simulator --gateway-url http://127.0.0.1:8000 --nodes 500 \\
        [--model sim] [--models-per-node 1] [--delay 0] [--token-rate 0] [--tokens 1] [--slots 1] [--reply TEXT]

Each simulated node is a real `Dialer` and `NodeSession` (handshake, heartbeats, metrics,
reconnection with backoff, cancellation), so a simulated node speaks exactly the protocol a
real one does; only the inference process is replaced. A stand-in waits `delay` seconds before
its first token, then makes `tokens` tokens at `token_rate` per second (0: all at once), serving
`slots` requests at a time and queueing the rest, as a llama.cpp process does. With `reply`, the tokens
are that text's words instead (a scripted answer: thinking, tool calls, Markdown). Used by the tests
and by bench/ to route over hundreds of nodes on one machine. The access key comes from
OPTIMAGPT_NODE_ACCESS_KEY, as for the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import tempfile
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .executors import SettingsError
from .hardware import Gpus
from .link import Dialer
from .protocol import OP_CHAT, OP_EMBEDDING, OP_TOKENIZE
from .settings import AgentSettings

log = logging.getLogger("node_agent.simulator")

EventSink = Callable[[str, dict[str, Any]], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Behaviour:
    """How a stand-in answers: seconds before the first token, tokens per reply, tokens per second (0: at once);
    `reply`, if given, is the answer, a word per token."""

    delay_s: float = 0.0
    tokens: int = 1
    token_rate: float = 0.0
    slots: int = 1
    reply: str = ""
    # Scripted tool use: call the tool of the request named `tool_call` (or ending in "_<tool_call>") with
    # `tool_args`, while the conversation holds fewer than `tool_rounds` tool results; after a tool result
    # the reply is "Tool result: <its content>".
    tool_call: str = ""
    tool_args: str = "{}"
    tool_rounds: int = 1

    def pieces(self, max_tokens: int | None, reply: str | None = None) -> list[str]:
        reply = self.reply if reply is None else reply
        words = re.findall(r"\S+\s*", reply) if reply else [f"t{i} " for i in range(self.tokens)]
        return words[: max(1, min(len(words), max_tokens or len(words)))]

    def scripted_call(self, body: dict[str, Any]) -> str | None:
        """The tool name to call now, if the script says to call one."""
        if not self.tool_call:
            return None
        messages = body.get("messages") or []
        if sum(1 for m in messages if m.get("role") == "tool") >= self.tool_rounds:
            return None
        for tool in body.get("tools") or []:
            name = str((tool.get("function") or {}).get("name") or "")
            if name == self.tool_call or name.endswith("_" + self.tool_call):
                return name
        return None

    @staticmethod
    def after_tool(body: dict[str, Any]) -> str | None:
        """The reply to a conversation whose last turn is a tool result."""
        messages = body.get("messages") or []
        if messages and messages[-1].get("role") == "tool":
            return "Tool result: " + str(messages[-1].get("content") or "")[:4000]
        return None


@dataclass
class SimProcess:
    """Stands in for one llama.cpp process: `slots` requests at a time, the others wait their turn."""

    behaviour: Behaviour
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    served: int = 0

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.behaviour.slots)

    @property
    def in_flight(self) -> int:
        return len(self.tasks)

    def submit(self, rid: str, request_json: str, sink: EventSink) -> bool:
        request = json.loads(request_json)
        self.tasks[rid] = asyncio.create_task(self._answer(rid, request, sink))
        return True

    def cancel(self, rid: str) -> None:
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()

    async def _tool_call(self, rid: str, name: str, stream: bool, sink: EventSink, max_tokens: int) -> None:
        """The scripted call, a token per character of its arguments: cut short past max_tokens, as a model's."""
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        arguments = self.behaviour.tool_args
        finish = "tool_calls"
        if max_tokens and max_tokens < len(arguments):
            arguments, finish = arguments[:max_tokens], "length"
        if stream:
            head = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            await self._emit(sink, {"type": "delta", "id": rid, "delta": {"tool_calls": [head]}})
            await self._emit(sink, {"type": "delta", "id": rid, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": arguments}}]}})
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        self.served += 1
        await self._emit(sink, {"type": "end", "id": rid, "finish_reason": finish,
                                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def _emit(self, sink: EventSink, event: dict[str, Any]) -> None:
        await sink(json.dumps(event, separators=(",", ":")), event)

    async def _answer(self, rid: str, request: dict[str, Any], sink: EventSink) -> None:
        b = self.behaviour
        op, stream = request.get("op"), bool(request.get("stream"))
        body = request.get("body") or {}
        called = b.scripted_call(body) if op == OP_CHAT else None
        after_tool = b.after_tool(body) if op == OP_CHAT else None
        pieces = b.pieces(int(body.get("max_tokens") or 0) or None, after_tool)
        tokens = len(pieces)
        try:
            async with self._slots:
                if b.delay_s:
                    await asyncio.sleep(b.delay_s)
                if op == OP_EMBEDDING:
                    inputs = body.get("input")
                    count = len(inputs) if isinstance(inputs, list) and not isinstance(inputs[0], int) else 1
                    await self._emit(sink, {"type": "end", "id": rid, "embeddings": [[0.5, 0.25, 0.125]] * count,
                                            "usage": {"prompt_tokens": count, "total_tokens": count}})
                    return
                if op == OP_TOKENIZE:  # no tokenizer here: a token per word, and a window of 4096
                    counts = {"system": 0, "tools": 0, "user": 0, "assistant": 0, "template": 0}
                    for message in body.get("messages") or []:
                        role = message.get("role")
                        part = role if role in ("system", "user", "assistant") else "tools"
                        counts[part] += len(str(message.get("content") or "").split())
                    await self._emit(sink, {"type": "end", "id": rid, "finish_reason": "stop", "counts": {
                        **counts, "prompt": sum(counts.values()), "window": 4096}})
                    return
                if called is not None:
                    await self._tool_call(rid, called, stream, sink, int(body.get("max_tokens") or 0))
                    return
                for piece in pieces:
                    if stream:
                        delta = {"delta": {"content": piece}} if op == OP_CHAT else {"text": piece}
                        await self._emit(sink, {"type": "delta", "id": rid, **delta})
                    if b.token_rate:
                        await asyncio.sleep(1 / b.token_rate)
                text = "".join(pieces)
                usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
                finish = "stop" if (after_tool or b.reply) and tokens == len(b.pieces(None, after_tool)) else "length"
                end: dict[str, Any] = {"type": "end", "id": rid, "finish_reason": finish, "usage": usage}
                if op == OP_CHAT:
                    end["message"] = {"role": "assistant", "content": "" if stream else text}
                else:
                    end["text"] = "" if stream else text
                self.served += 1
                await self._emit(sink, end)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._emit(sink, {"type": "end", "id": rid, "finish_reason": "cancelled",
                                        "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}})
        finally:
            self.tasks.pop(rid, None)


@dataclass
class SimExecutor:
    key: str
    model_id: str
    process: SimProcess
    embedding: bool = False
    state: str = "online"

    def submit(self, rid: str, request_json: str, sink: EventSink) -> SimProcess | None:
        if self.state != "online":
            return None
        self.process.submit(rid, request_json, sink)
        return self.process

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "model_id": self.model_id, "name": self.model_id, "family": "sim",
                "architecture": "sim", "parameter_count": 0, "quantization": "", "context_length": 2048,
                "embedding_length": 3, "n_ctx": 2048, "size_bytes": 0, "sha256": "", "description": "simulated",
                "embedding": self.embedding, "valid": True, "state": self.state, "error": "",
                "in_flight": self.process.in_flight, "replicas": self.process.behaviour.slots,
                "replicas_online": self.process.behaviour.slots if self.state == "online" else 0,
                "settings": {"enabled": True, "replicas": self.process.behaviour.slots}}


class SimManager:
    """What NodeSession needs of an ExecutorManager."""

    def __init__(self, executors: list[SimExecutor]) -> None:
        self.executors = {e.key: e for e in executors}

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe() for e in self.executors.values()]

    async def configure(self, key: str, changes: Any) -> dict[str, Any]:
        raise SettingsError("a simulated node has no settings to change")


class SimNode:
    """One simulated node dialing the gateway; `run()` until cancelled, re-dialing as the agent does."""

    def __init__(self, *, gateway_url: str, access_key: str, name: str, models: list[str], behaviour: Behaviour,
                 state_dir: Path, gpus: Gpus, heartbeat_interval_s: float = 2.0, metrics_interval_s: float = 2.0,
                 embedding_models: tuple[str, ...] = ()) -> None:
        self.node_id = str(uuid.uuid4())
        self.name = name
        executors = [SimExecutor(f"{m}.gguf", m, SimProcess(behaviour)) for m in models]
        executors += [SimExecutor(f"embed:{m}.gguf", m, SimProcess(behaviour), embedding=True)
                      for m in embedding_models]
        self.manager = SimManager(executors)
        self.settings = AgentSettings(
            gateway_url=gateway_url, access_key=access_key, model_dirs=(), embedding_model_dirs=(), enable=(),
            name=name, state_dir=state_dir / self.node_id, threads=1, n_ctx=0, parallel=1, n_gpu_layers=0,
            stream_interval_ms=0.0,
            hang_timeout_s=0.0, listen=None, heartbeat_interval_s=heartbeat_interval_s, rescan_interval_s=0.0,
            metrics_interval_s=metrics_interval_s, ca_file=None)
        # SimManager has the three methods of ExecutorManager that the link calls (duck-typed).
        self.dialer = Dialer(settings=self.settings, node_id=self.node_id, manager=self.manager,  # type: ignore[arg-type]
                             gpus=gpus)

    @property
    def linked(self) -> bool:
        return self.dialer.session is not None

    @property
    def served(self) -> int:
        return sum(e.process.served for e in self.manager.executors.values())

    async def run(self) -> None:
        await self.dialer.run_forever()


def make_nodes(*, gateway_url: str, access_key: str, count: int, model: str = "sim", models_per_node: int = 1,
               behaviour: Behaviour = Behaviour(), state_dir: Path, heartbeat_interval_s: float = 2.0,
               metrics_interval_s: float = 2.0, prefix: str = "sim") -> list[SimNode]:
    """`count` nodes; with `models_per_node` > 1 node i serves model-0 .. model-(n-1), else all serve `model`."""
    gpus = Gpus()
    models = [model] if models_per_node <= 1 else [f"{model}-{j}" for j in range(models_per_node)]
    return [SimNode(gateway_url=gateway_url, access_key=access_key, name=f"{prefix}-{i:04d}", models=models,
                    behaviour=behaviour, state_dir=state_dir, gpus=gpus, heartbeat_interval_s=heartbeat_interval_s,
                    metrics_interval_s=metrics_interval_s) for i in range(count)]


async def _main(args: argparse.Namespace) -> None:
    access_key = os.environ.get("OPTIMAGPT_NODE_ACCESS_KEY", "")
    if not access_key:
        raise SystemExit("OPTIMAGPT_NODE_ACCESS_KEY is not set")
    with tempfile.TemporaryDirectory(prefix="optimagpt-sim-") as state:
        nodes = make_nodes(gateway_url=args.gateway_url, access_key=access_key, count=args.nodes, model=args.model,
                           models_per_node=args.models_per_node,
                           behaviour=Behaviour(delay_s=args.delay, tokens=args.tokens, token_rate=args.token_rate,
                                               slots=args.slots, reply=args.reply, tool_call=args.tool_call,
                                               tool_args=args.tool_args, tool_rounds=args.tool_rounds),
                           state_dir=Path(state), heartbeat_interval_s=args.heartbeat_interval,
                           metrics_interval_s=args.metrics_interval, prefix=args.prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(n.run()) for n in nodes]
        print(f"simulating {len(nodes)} nodes against {args.gateway_url}", flush=True)
        linked = 0
        while not stop.is_set():
            now = sum(n.linked for n in nodes)
            if now != linked:
                linked = now
                print(f"linked {linked}/{len(nodes)}", flush=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        served = [n.served for n in nodes]
        print(f"stopped; served {sum(served)} requests (per node: min {min(served)}, max {max(served)})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m node_agent.simulator", description=__doc__.split("\n")[0])
    parser.add_argument("--gateway-url", default=os.environ.get("OPTIMAGPT_GATEWAY_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--model", default="sim", help="model id served (default: sim)")
    parser.add_argument("--models-per-node", type=int, default=1, help="serve MODEL-0 .. MODEL-(N-1) on every node")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the first token")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per reply (capped by max_tokens)")
    parser.add_argument("--token-rate", type=float, default=0.0, help="tokens per second; 0: at once")
    parser.add_argument("--slots", type=int, default=1, help="requests each model serves at once")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--metrics-interval", type=float, default=2.0)
    parser.add_argument("--prefix", default="sim", help="node names are PREFIX-0000, PREFIX-0001, ...")
    parser.add_argument("--reply", default="", help="answer with this text, a word per token (instead of --tokens)")
    parser.add_argument("--tool-call", default="", help="call the request's tool of this name (or ending _NAME)")
    parser.add_argument("--tool-args", default="{}", help="the scripted tool call's arguments (JSON text)")
    parser.add_argument("--tool-rounds", type=int, default=1,
                        help="call it while the conversation has fewer tool results than this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("OPTIMAGPT_NODE_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
