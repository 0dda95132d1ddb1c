"""The node's models: found by scanning folders, each run as one or more supervised inference processes.

An executor is one model file with its settings. Settings are changed from the
gateway (`configure`), kept in the node's state folder so that enabled models
start again after a restart, and applied by restarting the model's processes.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import psutil

from .default_model import sha256_file
from .gguf_header import GGUFInfo, InvalidGGUF, read_gguf_header
from .protocol import valid_model_id
from .runtimes.llama_cpp import EventSink, LlamaCppProcess, ProcessConfig

log = logging.getLogger("node_agent.executors")

EMBEDDING_KEY_PREFIX = "embed:"
MAX_REPLICAS = 16
MAX_PARALLEL = 64
# Requests one process decodes together by default, where memory holds their key-value caches.
DEFAULT_PARALLEL = 8
MIN_AUTO_CTX = 512
# Share of the memory available at start that the automatic context windows of one model may take.
AUTO_CTX_MEMORY_SHARE = 0.5
_CHAT_FORMAT = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")


def model_id_for(path: Path) -> str:
    """The public model id a file is served under by default: its name, lower case, without the extension."""
    return re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-")


class SettingsError(ValueError):
    """Executor settings that cannot be applied; the message says which and why."""


@dataclass(frozen=True)
class ExecutorSettings:
    """What an admin chooses for one model. Zero or None means: let the node choose."""

    enabled: bool = False
    alias: str = ""  # public model id; empty: derived from the file name
    description: str = ""  # empty: made from the GGUF header
    n_ctx: int = 0  # context window; 0: the model's own, as far as free memory allows
    n_gpu_layers: int | None = None  # None: all where a GPU exists, else 0; -1 also means all
    threads: int = 0  # 0: the node's default
    replicas: int = 1  # processes sharing the mmapped weights, each with its own key-value cache
    parallel: int = 0  # requests each process decodes together; 0: up to 8, as memory allows
    chat_format: str = ""  # llama-cpp-python chat format name; empty: the model's own template
    embedding: bool | None = None  # None: by folder (embedding folders serve embeddings only)
    max_tokens: int = 0  # cap on the tokens of one reply; 0: none beyond the context window

    @classmethod
    def parse(cls, data: Any, *, base: ExecutorSettings | None = None) -> ExecutorSettings:
        """`base` with the fields in `data` changed; SettingsError for unknown fields or bad values."""
        if not isinstance(data, dict):
            raise SettingsError("settings must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown setting {unknown[0]!r}")
        result = replace(base or cls(), **data)
        result.validate()
        return result

    def validate(self) -> None:
        def integer(name: str, low: int, high: int, *, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise SettingsError(f"{name} must be an integer from {low} to {high}")

        for name in ("enabled",):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name} must be true or false")
        if self.embedding is not None and not isinstance(self.embedding, bool):
            raise SettingsError("embedding must be true, false or null")
        if not isinstance(self.alias, str) or (self.alias and not valid_model_id(self.alias)):
            raise SettingsError("alias must be 1 to 200 letters, digits and . _ : / - (starting with a letter "
                                "or digit), or empty")
        if not isinstance(self.description, str) or len(self.description) > 1000:
            raise SettingsError("description must be text of at most 1000 characters")
        if not isinstance(self.chat_format, str) or (self.chat_format and not _CHAT_FORMAT.fullmatch(self.chat_format)):
            raise SettingsError("chat_format must be a chat format name such as chatml or gemma, or empty")
        integer("n_ctx", 0, 1 << 20)
        integer("n_gpu_layers", -1, 100_000, optional=True)
        integer("threads", 0, 1024)
        integer("replicas", 1, MAX_REPLICAS)
        integer("parallel", 0, MAX_PARALLEL)
        integer("max_tokens", 0, 1 << 20)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SettingsStore:
    """Executor settings by model key, in one JSON file of the node's state folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, ExecutorSettings]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.error("%s is not valid JSON; starting with default settings", self.path)
            return {}
        settings: dict[str, ExecutorSettings] = {}
        for key, data in (raw if isinstance(raw, dict) else {}).items():
            try:
                settings[key] = ExecutorSettings.parse(data)
            except (SettingsError, TypeError) as exc:
                log.error("ignoring the saved settings of %s: %s", key, exc)
        return settings

    def save(self, settings: dict[str, ExecutorSettings]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({k: s.as_dict() for k, s in sorted(settings.items())}, indent=1))
        os.replace(partial, self.path)  # never half a file, even if the node dies mid-write


@dataclass(frozen=True)
class ModelFile:
    key: str  # path relative to its models folder (embedding folders: prefixed): stable, unique on the node
    path: Path
    size: int
    mtime: float
    info: GGUFInfo | None
    error: str = ""
    embedding_folder: bool = False


def scan_model_dirs(dirs: tuple[Path, ...], known: dict[str, ModelFile] | None = None,
                    embedding_dirs: tuple[Path, ...] = ()) -> dict[str, ModelFile]:
    """Every .gguf below `dirs` and `embedding_dirs`, recursively.

    A link leading outside its folder is reported as refused, never opened.
    Headers are read only for files not in `known` with the same path, size and
    modification time: a rescan every few seconds must not cost parsing time
    that the models' own threads need.
    """
    known = known or {}
    found: dict[str, ModelFile] = {}
    roots = [(root, False) for root in dirs] + [(root, True) for root in embedding_dirs]
    for root, embedding in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.gguf")):
            key = (EMBEDDING_KEY_PREFIX if embedding else "") + path.relative_to(root).as_posix()
            if key in found:
                log.warning("ignoring %s: %s was found first under another folder", path, key)
                continue
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):
                continue  # a dangling link, or a file removed while we looked
            if not real.is_relative_to(root) or not real.is_file():
                log.warning("refusing %s: it points outside %s", path, root)
                found[key] = ModelFile(key, path, 0, 0.0, None, f"refused: it points outside the folder {root}",
                                       embedding)
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
            found[key] = ModelFile(key, real, stat.st_size, stat.st_mtime, info, error, embedding)
    return found


@dataclass(frozen=True)
class NodeDefaults:
    """What the node chooses where an executor's settings leave it open."""

    n_ctx_cap: int  # automatic context windows stay at or below this (0: no cap but the model's own)
    threads: int
    n_gpu_layers: int  # -1 where a GPU exists, else 0
    stream_interval_ms: float
    parallel: int = 0  # requests a process decodes together where an executor leaves it open; 0: as memory allows
    hang_timeout_s: float = 300.0
    load_timeout_s: float = 120.0


def _human_bytes(n: int) -> str:
    """Sizes as file managers and the gateway's pages show them: powers of 1024."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


class ModelSupervisor:
    """One model on this node (the gateway's Executor row mirrors it): its settings, and the processes that serve it."""

    def __init__(self, model: ModelFile, settings: ExecutorSettings, on_state: Callable[[], None]) -> None:
        self.model = model
        self.settings = settings
        self.sha256 = ""
        self.processes: list[LlamaCppProcess] = []
        self._on_state = on_state
        self._auto: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._lock = asyncio.Lock()  # one apply at a time: configure calls must not interleave restarts

    @property
    def model_id(self) -> str:
        return self.settings.alias or model_id_for(self.model.path)

    @property
    def embedding(self) -> bool:
        return self.model.embedding_folder if self.settings.embedding is None else self.settings.embedding

    @property
    def state(self) -> str:
        if self.model.info is None:
            return "failed"
        states = {p.state for p in self.processes}
        for state in ("online", "starting", "stopping"):
            if state in states:
                return state
        return "failed" if states == {"failed"} else "offline"

    @property
    def error(self) -> str:
        if self.model.info is None:
            return self.model.error
        return next((p.last_error for p in self.processes if p.last_error), "")

    def auto_description(self) -> str:
        info = self.model.info
        if info is None:
            return self.model.error
        parts = [info.family, f"{_human_count(info.parameter_count)} parameters", info.quantization]
        if info.context_length:
            parts.append(f"{info.context_length}-token context")
        parts.append(_human_bytes(self.model.size))
        return f"{info.name}: " + ", ".join(parts)

    # -- serving ------------------------------------------------------------
    def submit(self, rid: str, request_json: str, sink: EventSink) -> LlamaCppProcess | None:
        """Give the request to the least busy online replica (or a starting one); None if none can take it."""
        for wanted in ("online", "starting"):
            candidates = [p for p in self.processes if p.state == wanted]
            if candidates:
                process = min(candidates, key=lambda p: p.in_flight)
                return process if process.submit(rid, request_json, sink) else None
        return None

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self.processes)

    async def apply(self, defaults: NodeDefaults) -> None:
        """Run the processes the settings ask for: restart them when their configuration changed, stop them
        when disabled."""
        async with self._lock:
            config = self.process_config(defaults) if self.settings.enabled else None
            current = self.processes[0].config if self.processes else None
            if config == current and len(self.processes) == (self.settings.replicas if config else 0):
                for process in self.processes:
                    if process.state in ("offline", "failed"):
                        process.start()  # an explicit start also retries a model that gave up
                return
            old, self.processes = self.processes, []
            await asyncio.gather(*(p.stop() for p in old))
            if config is not None:
                self.processes = [LlamaCppProcess(config, self._on_state) for _ in range(self.settings.replicas)]
                for process in self.processes:
                    process.start()
            self._on_state()

    async def stop(self) -> None:
        async with self._lock:
            await asyncio.gather(*(p.stop() for p in self.processes))
            self.processes = []

    def process_config(self, defaults: NodeDefaults) -> ProcessConfig | None:
        info = self.model.info
        if info is None:
            return None
        s = self.settings
        n_ctx, parallel = self._fit(info, defaults)
        return ProcessConfig(
            model_path=str(self.model.path),
            n_ctx=n_ctx,
            threads=s.threads or defaults.threads,
            n_gpu_layers=defaults.n_gpu_layers if s.n_gpu_layers is None else s.n_gpu_layers,
            chat_format=s.chat_format or None,
            max_tokens_cap=s.max_tokens,
            stream_interval_ms=defaults.stream_interval_ms,
            embedding=self.embedding,
            parallel=parallel,
            load_timeout_s=defaults.load_timeout_s,
            hang_timeout_s=defaults.hang_timeout_s,
        )

    def _fit(self, info: GGUFInfo, defaults: NodeDefaults) -> tuple[int, int]:
        """The context window of one request and the requests decoded together, as the settings and memory allow.

        Worked out once per choice of replicas, parallel and window: free memory moves all the time, and a
        window that moved with it would restart the processes on every unrelated change.
        """
        s = self.settings
        key = (s.replicas, s.parallel or defaults.parallel, s.n_ctx)
        if key not in self._auto:
            self._auto[key] = self._fit_now(info, defaults)
        return self._auto[key]

    def _fit_now(self, info: GGUFInfo, defaults: NodeDefaults) -> tuple[int, int]:
        """An admin's n_ctx and parallel as given (the window capped by the model's own); what is left open, fitted
        into half the memory available now, shared by the replicas: first the window (the model's own, capped by
        the node's cap, for one sequence, or for `parallel` if given), then as many sequences of it as fit, up to 8.
        """
        s = self.settings
        wanted = s.parallel or defaults.parallel
        trained = info.context_length or 0
        per_token = info.kv_bytes_per_token()
        budget = psutil.virtual_memory().available * AUTO_CTX_MEMORY_SHARE / s.replicas
        if s.n_ctx:
            n_ctx = min(s.n_ctx, trained) if trained else s.n_ctx
        else:
            n_ctx = trained or defaults.n_ctx_cap or 4096
            if defaults.n_ctx_cap:
                n_ctx = min(n_ctx, defaults.n_ctx_cap)
            if per_token:
                n_ctx = min(n_ctx, int(budget // (per_token * (wanted or 1))) // 256 * 256)
            n_ctx = max(n_ctx, MIN_AUTO_CTX)
        if self.embedding:
            return n_ctx, 1
        if wanted:
            return n_ctx, wanted
        fits = int(budget // (per_token * n_ctx)) if per_token else DEFAULT_PARALLEL
        return n_ctx, max(1, min(DEFAULT_PARALLEL, fits))

    def describe(self, defaults: NodeDefaults) -> dict[str, Any]:
        info = self.model.info
        running = [p.n_ctx for p in self.processes if p.n_ctx]
        running_parallel = [p.parallel for p in self.processes if p.n_ctx]
        config = self.process_config(defaults)
        return {
            "key": self.model.key,
            "model_id": self.model_id,
            "name": info.name if info else self.model.path.name,
            "family": info.family if info else "",
            "architecture": info.architecture if info else "",
            "parameter_count": info.parameter_count if info else 0,
            "quantization": info.quantization if info else "",
            "context_length": (info.context_length or 0) if info else 0,
            "embedding_length": (info.embedding_length or 0) if info else 0,
            "n_ctx": running[0] if running else (config.n_ctx if config else 0),
            "size_bytes": self.model.size,
            "sha256": self.sha256,
            "description": self.settings.description or self.auto_description(),
            "embedding": self.embedding,
            "valid": info is not None,
            "state": self.state,
            "error": self.error[:2000],
            "in_flight": self.in_flight,
            "replicas": self.settings.replicas,
            "replicas_online": sum(p.state == "online" for p in self.processes),
            "parallel": running_parallel[0] if running_parallel else (config.parallel if config else 1),
            "settings": self.settings.as_dict(),
        }


class ExecutorManager:
    """Keeps one ModelSupervisor per model file in step with the folders, and reports every change."""

    def __init__(self, *, dirs: tuple[Path, ...], defaults: NodeDefaults, on_change: Callable[[], None],
                 store: SettingsStore | None = None, embedding_dirs: tuple[Path, ...] = (),
                 enable: Iterable[str] = ()) -> None:
        self.dirs = dirs
        self.embedding_dirs = embedding_dirs
        self.defaults = defaults
        self.store = store
        self.enable_patterns = tuple(enable)
        self.executors: dict[str, ModelSupervisor] = {}
        self._settings = store.load() if store is not None else {}
        self._hashes: dict[tuple[str, int, float], str] = {}
        self._hashing: asyncio.Task[None] | None = None
        self._on_change = on_change

    def _first_sight_settings(self, model: ModelFile) -> ExecutorSettings:
        """Saved settings, or for a model never seen: enabled if a --enable pattern matches, else offline."""
        saved = self._settings.get(model.key)
        if saved is not None:
            return saved
        names = (model.key, model.path.name)
        enabled = any(fnmatch.fnmatchcase(n, p) for p in self.enable_patterns for n in names)
        return ExecutorSettings(enabled=enabled)

    async def rescan(self) -> bool:
        """Bring executors in line with the files; True when anything changed."""
        known = {key: executor.model for key, executor in self.executors.items()}
        found = await asyncio.to_thread(scan_model_dirs, self.dirs, known, self.embedding_dirs)
        changed = False
        for key in list(self.executors):
            current = found.get(key)
            old = self.executors[key].model
            if current is None or (current.path, current.mtime, current.size) != (old.path, old.mtime, old.size):
                log.info("model %s %s", key, "removed" if current is None else "changed")
                await self.executors.pop(key).stop()
                changed = True
        for key, model in found.items():
            if key not in self.executors:
                executor = ModelSupervisor(model, self._first_sight_settings(model), self._on_change)
                self.executors[key] = executor
                if model.info is None:
                    log.warning("model %s cannot be served: %s", key, model.error)
                else:
                    log.info("model %s found: %s (%s)", key, executor.model_id,
                             "enabled" if executor.settings.enabled else "offline until enabled")
                    await executor.apply(self.defaults)
                changed = True
        if changed:
            self._on_change()
            self._hash_in_background()
        return changed

    async def configure(self, key: str, changes: Any) -> dict[str, Any]:
        """Change an executor's settings, keep them, and apply them (restarting its processes as needed)."""
        executor = self.executors.get(key)
        if executor is None:
            raise SettingsError(f"no model {key!r} on this node")
        settings = ExecutorSettings.parse(changes, base=executor.settings)
        if settings.enabled and executor.model.info is None:
            raise SettingsError(f"{key} cannot be started: {executor.model.error}")
        if settings.chat_format and not await asyncio.to_thread(_chat_format_exists, settings.chat_format):
            raise SettingsError(f"unknown chat format {settings.chat_format!r}")
        executor.settings = settings
        self._settings[key] = settings
        if self.store is not None:
            await asyncio.to_thread(self.store.save, dict(self._settings))
        log.info("model %s settings changed: %s", key, changes)
        await executor.apply(self.defaults)
        self._on_change()
        return executor.describe(self.defaults)

    def _hash_in_background(self) -> None:
        if self._hashing is None or self._hashing.done():
            self._hashing = asyncio.create_task(self._hash_missing(), name="hash model files")

    async def _hash_missing(self) -> None:
        """SHA-256 of each valid model file, one at a time in a thread, remembered by path, size and time."""
        while True:
            todo = [e for e in self.executors.values() if not e.sha256 and e.model.info is not None]
            if not todo:
                return
            for executor in todo:
                model = executor.model
                ident = (str(model.path), model.size, model.mtime)
                digest = self._hashes.get(ident)
                if digest is None:
                    try:
                        digest = await asyncio.to_thread(sha256_file, model.path)
                    except OSError as exc:
                        log.warning("cannot hash %s: %s", model.path, exc)
                        digest = ""
                    self._hashes[ident] = digest
                if self.executors.get(model.key) is executor:
                    executor.sha256 = digest or "unreadable"
            self._on_change()

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.rescan()
            except Exception:
                log.exception("model scan failed")
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass

    async def stop_all(self) -> None:
        if self._hashing is not None:
            self._hashing.cancel()
        await asyncio.gather(*(e.stop() for e in self.executors.values()))

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe(self.defaults) for e in self.executors.values()]


def _chat_format_exists(name: str) -> bool:
    from llama_cpp import llama_chat_format

    return hasattr(llama_chat_format, "format_" + name.replace("-", "_"))
