"""The node's models: found by scanning folders, each run as one supervised inference process."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf_header import GGUFInfo, InvalidGGUF, read_gguf_header
from .runtimes.llama_cpp import LlamaCppProcess, ProcessConfig

log = logging.getLogger("node_agent.executors")


def model_id_for(path: Path) -> str:
    """The public model id a file is served under: its name, lower case, without the extension."""
    return re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-")


@dataclass(frozen=True)
class ModelFile:
    key: str  # path relative to its models folder: stable across restarts, unique on the node
    path: Path
    size: int
    mtime: float
    info: GGUFInfo | None
    error: str = ""


def scan_model_dirs(dirs: tuple[Path, ...], known: dict[str, ModelFile] | None = None) -> dict[str, ModelFile]:
    """Every .gguf below `dirs`, recursively. Links that lead outside their folder are refused.

    Headers are read only for files not in `known` with the same path, size and
    modification time: a rescan every few seconds must not cost parsing time
    that the models' own threads need.
    """
    known = known or {}
    found: dict[str, ModelFile] = {}
    for root in dirs:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.gguf")):
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if not real.is_relative_to(root) or not real.is_file():
                log.warning("ignoring %s: it points outside %s", path, root)
                continue
            key = path.relative_to(root).as_posix()
            if key in found:
                log.warning("ignoring %s: %s was found first under another folder", path, key)
                continue
            stat = real.stat()
            previous = known.get(key)
            if previous is not None and (previous.path, previous.size, previous.mtime) == (
                    real, stat.st_size, stat.st_mtime):
                found[key] = previous
                continue
            try:
                info, error = read_gguf_header(real), ""
            except (InvalidGGUF, OSError) as exc:
                info, error = None, f"invalid GGUF: {exc}"
            found[key] = ModelFile(key, real, stat.st_size, stat.st_mtime, info, error)
    return found


class Executor:
    """One model on this node and the process that serves it."""

    def __init__(self, model: ModelFile, config: ProcessConfig | None, on_state: Callable[[], None]) -> None:
        self.model = model
        self.model_id = model_id_for(model.path)
        self.process = LlamaCppProcess(config, on_state) if config is not None else None

    @property
    def state(self) -> str:
        return self.process.state if self.process is not None else "failed"

    def describe(self) -> dict[str, Any]:
        info = self.model.info
        process = self.process
        return {
            "key": self.model.key,
            "model_id": self.model_id,
            "name": info.name if info else self.model.path.name,
            "architecture": info.architecture if info else "",
            "parameter_count": info.parameter_count if info else 0,
            "quantization": info.quantization if info else "",
            "context_length": (info.context_length or 0) if info else 0,
            "n_ctx": process.config.n_ctx if process else 0,
            "size_bytes": self.model.size,
            "state": self.state,
            "error": (process.last_error if process else self.model.error)[:2000],
            "in_flight": process.in_flight if process else 0,
        }


class ExecutorManager:
    """Keeps one Executor per model file in step with the folders, and reports every change."""

    def __init__(self, *, dirs: tuple[Path, ...], n_ctx: int, threads: int, n_gpu_layers: int,
                 stream_interval_ms: float, on_change: Callable[[], None]) -> None:
        self.dirs = dirs
        self.stream_interval_ms = stream_interval_ms
        self.n_ctx = n_ctx
        self.threads = threads
        self.n_gpu_layers = n_gpu_layers
        self.executors: dict[str, Executor] = {}
        self._on_change = on_change

    def _config(self, model: ModelFile) -> ProcessConfig | None:
        if model.info is None:
            return None
        n_ctx = min(self.n_ctx, model.info.context_length or self.n_ctx)
        return ProcessConfig(model_path=str(model.path), n_ctx=n_ctx, threads=self.threads,
                             n_gpu_layers=self.n_gpu_layers, stream_interval_ms=self.stream_interval_ms)

    async def rescan(self) -> bool:
        """Bring executors in line with the files; True when anything changed."""
        known = {key: executor.model for key, executor in self.executors.items()}
        found = await asyncio.to_thread(scan_model_dirs, self.dirs, known)
        changed = False
        for key in list(self.executors):
            current = found.get(key)
            old = self.executors[key].model
            if current is None or (current.mtime, current.size) != (old.mtime, old.size):
                log.info("model %s %s", key, "removed" if current is None else "changed")
                executor = self.executors.pop(key)
                if executor.process is not None:
                    await executor.process.stop()
                changed = True
        for key, model in found.items():
            if key not in self.executors:
                executor = Executor(model, self._config(model), self._on_change)
                self.executors[key] = executor
                if executor.process is not None:
                    log.info("model %s found: %s", key, executor.model_id)
                    executor.process.start()
                else:
                    log.warning("model %s cannot be served: %s", key, model.error)
                changed = True
        if changed:
            self._on_change()
        return changed

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.rescan()
            except Exception:  # noqa: BLE001 - a bad scan must not end the watcher
                log.exception("model scan failed")
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    async def stop_all(self) -> None:
        await asyncio.gather(*(e.process.stop() for e in self.executors.values() if e.process is not None))

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe() for e in self.executors.values()]
