"""Coverage-guided fuzzing (atheris) of the parsers that read bytes from outside.

    python fuzz/fuzz.py gguf   [-max_total_time=300]   # node_agent.gguf_header: model files on a node's disk
    python fuzz/fuzz.py link   [-max_total_time=300]   # a gateway's messages as the node agent handles them
    python fuzz/fuzz.py pipe   [-max_total_time=300]   # the worker's request frames and request parsing
    python fuzz/fuzz.py seed                            # write the starting corpus to fuzz/corpus/

Each target says which exceptions are the parser's documented refusals; anything else escaping is a
crash: atheris stops and writes the input to crash-<hash>. Crashes found are fixed and their inputs kept
in fuzz/regressions/<target>/, which tests/test_fuzz_regressions.py replays on every test run.
Needs `pip install -r requirements/bench.txt` (atheris). Arguments after the target go to libFuzzer.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from node_agent.gguf_header import InvalidGGUF, read_gguf_header  # noqa: E402
from node_agent.protocol import pipe_frame  # noqa: E402

_SCRATCH = Path(tempfile.mkdtemp(prefix="optimagpt-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


# -- gguf -----------------------------------------------------------------------------
def gguf(data: bytes) -> None:
    """A node reads every .gguf it finds: anything but InvalidGGUF (or a read error) would stop its scan."""
    path = _SCRATCH / "input.gguf"
    path.write_bytes(data)
    try:
        read_gguf_header(path)
    except (InvalidGGUF, OSError):
        pass


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_seeds() -> list[bytes]:
    kv = (_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
          + _gguf_string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 2048)
          + _gguf_string("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 32))
    tensor = _gguf_string("w") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<IQ", 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 3) + kv + tensor
    return [head + b"\0" * (64 - len(head) % 32 + 64), b"GGUF" + struct.pack("<IQQ", 3, 0, 0), b"GGUF"]


# -- the link, as the node agent reads it ----------------------------------------------
class _Socket:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, message: str) -> None:
        self.sent.append(message)

    async def recv(self) -> str:
        raise ConnectionError("no more")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


class _Manager:
    """Executors that take any request (a real process is not needed to parse what arrives)."""

    class _Process:
        def cancel(self, rid: str) -> None:
            pass

    class _Executor:
        state = "online"

        def submit(self, rid: str, raw: str, sink: Any) -> Any:
            json.loads(raw)  # what the worker will do with it first
            return _Manager._Process()

    def __init__(self) -> None:
        self.executors = {"m.gguf": self._Executor()}

    async def configure(self, key: str, changes: Any) -> dict[str, Any]:
        from node_agent.executors import ExecutorSettings

        ExecutorSettings.parse(changes)
        return {}

    def describe(self) -> list[dict[str, Any]]:
        return []


_LOOP = asyncio.new_event_loop()


def link(data: bytes) -> None:
    """Messages from a gateway: a JSON object is handled, anything else ends the link (ValueError)."""
    from node_agent.link import NodeSession
    from node_agent.settings import AgentSettings

    settings = AgentSettings(gateway_url="http://127.0.0.1:1", access_key="k", model_dirs=(),
                             embedding_model_dirs=(), enable=(), name="fuzz", state_dir=_SCRATCH, threads=1,
                             n_ctx=0, parallel=1, n_gpu_layers=0, stream_interval_ms=0.0,
                             hang_timeout_s=0.0, listen=None,
                             heartbeat_interval_s=2.0, rescan_interval_s=0.0, metrics_interval_s=2.0, ca_file=None)
    # A stand-in for the executors and GPUs: the fuzzer drives the link's parsing, not the models.
    session = NodeSession(_Socket(), settings=settings, node_id="n", manager=_Manager(), gpus=None)  # type: ignore[arg-type]
    text = data.decode("utf-8", errors="replace")

    async def handle() -> None:
        for raw in text.split("\x00"):  # several messages in one input
            try:
                message = json.loads(raw)
            except (ValueError, RecursionError):
                continue  # NodeSession._recv_raw raises these: the link ends, as designed
            if isinstance(message, dict):
                await session._handle(raw, message)
        for task in list(session._control_tasks):
            await task

    _LOOP.run_until_complete(handle())


def link_seeds() -> list[bytes]:
    request = {"type": "request", "id": "a", "executor": "m.gguf", "op": "chat", "stream": True, "deadline_s": 5,
               "body": {"messages": [{"role": "user", "content": "hi"}]}}
    parts = [json.dumps({"type": "part", "id": "b", "data": json.dumps(request)[:30], "more": True}),
             json.dumps({"type": "part", "id": "b", "data": json.dumps(request)[30:], "more": False})]
    return [json.dumps(request).encode(), "\x00".join(parts).encode(),
            json.dumps({"type": "request", "id": "c", "executor": "m.gguf", "op": "configure",
                        "body": {"n_ctx": 512}}).encode(),
            b'{"type":"cancel","id":"a"}\x00{"type":"ping","t":1}']


# -- the worker's pipe and request parsing ---------------------------------------------------
def pipe(data: bytes) -> None:
    """Frames on the worker's stdin, and the pure parts of its request handling."""
    from node_agent.runtimes import llama_cpp_worker as worker

    for frame in worker._frames(io.BytesIO(data)):
        try:
            request = json.loads(frame)
        except (ValueError, RecursionError):
            continue
        if not isinstance(request, dict):
            continue
        body = request.get("body")
        if not isinstance(body, dict):
            continue
        try:
            messages = body.get("messages")
            if isinstance(messages, list):
                for message in messages:
                    if isinstance(message, dict):
                        worker._normalize_message(message)
            tools = body.get("tools")
            if isinstance(tools, list):
                worker._forced_tool(tools, body.get("tool_choice"))
            for item in body.get("input") or []:
                if isinstance(item, list):
                    worker._check_token_ids(item, 49152, "input")
            if isinstance(body.get("text"), str):
                worker._parse_tool_call(body["text"])
        except worker.RequestError:
            pass  # a refusal the client gets as a 400


def pipe_seeds() -> list[bytes]:
    chat = {"op": "chat", "id": "a", "stream": False, "body": {
        "messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required", "text": "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>"}}
    embed = {"op": "embedding", "id": "b", "body": {"input": [[1, 2, 3], [49151]]}}
    return [pipe_frame(json.dumps(chat).encode()) + pipe_frame(json.dumps(embed).encode()),
            pipe_frame(json.dumps(chat, indent=2).encode()), b"12\n{\"op\":\"x\"}", b"-1\n"]


TARGETS = {"gguf": (gguf, gguf_seeds), "link": (link, link_seeds), "pipe": (pipe, pipe_seeds)}


def seed() -> None:
    for name, (_, seeds) in TARGETS.items():
        folder = HERE / "corpus" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seeds()):
            (folder / f"seed-{i}").write_bytes(data)
        print(f"{name}: {len(seeds())} seeds in {folder}")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*TARGETS, "seed"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "seed":
        seed()
        return
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # what the parsers log about bad input is expected, and slows the search
    name = sys.argv[1]
    target = TARGETS[name][0]
    corpus = HERE / "corpus" / name
    if not corpus.is_dir():
        seed()
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], lambda data: target(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
