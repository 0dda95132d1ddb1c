"""The node agent's settings: command-line flags, each with an environment variable behind it."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

LINK_PATH = "/ws/node/"
# Streamed tokens made within this many ms travel as one chunk: a wake-up per token costs tokens/s
# (bench/README.md, "Measurements behind the code").
DEFAULT_STREAM_INTERVAL_MS = 50.0


def _env(name: str, default: str | None = None) -> str | None:
    """The variable's value; unset or empty (as in a copied .env.example) means the default."""
    return os.environ.get(name) or default


def _secret(name: str) -> str | None:
    """A secret from NAME, or from the file named by NAME_FILE (Docker and systemd credentials)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(name) or None


def _env_list(name: str, default: str) -> list[str]:
    return [item for item in (_env(name, default) or "").split(":") if item]


def link_url(gateway_url: str) -> str:
    """The WebSocket address of the gateway's node link: https gives wss, http gives ws."""
    parts = urlsplit(gateway_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"gateway URL must be http(s)://host[:port], got {gateway_url!r}")
    path = parts.path if parts.path.endswith(LINK_PATH) else parts.path.rstrip("/") + LINK_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


# Written by `python -m node_agent join` (node_agent/enroll.py): the node links with its own credential (kept as
# its node_secret) instead of the shared access key.
ENROLLED_FILE = "enrolled"


@dataclass(frozen=True)
class AgentSettings:
    gateway_url: str
    access_key: str
    model_dirs: tuple[Path, ...]
    embedding_model_dirs: tuple[Path, ...]
    enable: tuple[str, ...]
    name: str
    state_dir: Path
    threads: int
    n_ctx: int
    parallel: int
    n_gpu_layers: int | None
    stream_interval_ms: float
    hang_timeout_s: float
    listen: tuple[str, int] | None  # listen mode: gateways dial this (host, port); None: dial the gateway
    heartbeat_interval_s: float
    rescan_interval_s: float
    metrics_interval_s: float
    ca_file: str | None
    access_key_file: str = ""  # where the key was read from, if a file: read again before each handshake

    @property
    def enrolled(self) -> bool:
        return (self.state_dir / ENROLLED_FILE).exists()

    def current_access_key(self) -> str:
        """The key to prove now: a key file is read again, so a key the gateway rotated (and wrote there for its
        local node) is taken without a restart; the key read at start if the file cannot be read."""
        if self.access_key_file:
            try:
                return Path(self.access_key_file).read_text().strip() or self.access_key
            except OSError:
                return self.access_key
        return self.access_key

    @property
    def link_url(self) -> str:
        return link_url(self.gateway_url)

    @property
    def origin(self) -> str:
        parts = urlsplit(self.gateway_url)
        return f"{'https' if parts.scheme in ('https', 'wss') else 'http'}://{parts.netloc}"


def parse_settings(argv: list[str] | None = None) -> AgentSettings:
    parser = argparse.ArgumentParser(
        prog="python -m node_agent",
        description="OptimaGPT node agent: runs GGUF models with llama.cpp and serves them to a gateway.",
    )
    parser.add_argument("--gateway-url", default=_env("OPTIMAGPT_GATEWAY_URL", "http://127.0.0.1:8000"),
                        help="gateway to dial; https means wss (env OPTIMAGPT_GATEWAY_URL)")
    parser.add_argument("--models-dir", action="append", default=None,
                        help="folder scanned recursively for .gguf files; repeatable "
                             "(env OPTIMAGPT_MODELS_DIRS, separated by ':')")
    parser.add_argument("--embedding-models-dir", action="append", default=None,
                        help="folder of embedding models, scanned recursively; they serve /v1/embeddings only. "
                             "Repeatable (env OPTIMAGPT_EMBEDDING_MODELS_DIRS, separated by ':')")
    parser.add_argument("--enable", action="append", default=None, metavar="PATTERN",
                        help="start models whose file name or path matches this glob when first seen ('*': all); "
                             "others appear offline until an admin starts them. Repeatable "
                             "(env OPTIMAGPT_NODE_ENABLE, separated by ':')")
    parser.add_argument("--name", default=_env("OPTIMAGPT_NODE_NAME", socket.gethostname()),
                        help="name shown on the gateway (env OPTIMAGPT_NODE_NAME)")
    parser.add_argument("--state-dir", default=_env("OPTIMAGPT_NODE_STATE_DIR",
                                                    str(Path.home() / ".local/share/optimagpt-node")),
                        help="where the node keeps its identity (env OPTIMAGPT_NODE_STATE_DIR)")
    parser.add_argument("--threads", type=int, default=int(_env("OPTIMAGPT_NODE_THREADS", "0") or 0),
                        help="llama.cpp threads per model; 0 means one per core (env OPTIMAGPT_NODE_THREADS)")
    parser.add_argument("--ctx", type=int, default=int(_env("OPTIMAGPT_NODE_CTX", "4096") or 4096),
                        help="largest context window chosen automatically (0: the model's own); a model's own "
                             "setting may ask for more (env OPTIMAGPT_NODE_CTX)")
    parser.add_argument("--parallel", type=int, default=int(_env("OPTIMAGPT_NODE_PARALLEL", "0") or 0),
                        help="requests each model process decodes together, where an executor's own setting is "
                             "0; 0: up to 8, as free memory allows (env OPTIMAGPT_NODE_PARALLEL)")
    parser.add_argument("--n-gpu-layers", type=int, default=None,
                        help="layers to offload to the GPU; default all when an NVIDIA GPU is found, else 0")
    parser.add_argument("--stream-interval-ms", type=float,
                        default=float(_env("OPTIMAGPT_NODE_STREAM_INTERVAL_MS") or DEFAULT_STREAM_INTERVAL_MS),
                        help="join tokens made within this many ms into one streamed chunk; 0 sends each token "
                             "alone (env OPTIMAGPT_NODE_STREAM_INTERVAL_MS)")
    parser.add_argument("--hang-timeout", type=float,
                        default=float(_env("OPTIMAGPT_NODE_HANG_TIMEOUT_S", "300") or 300),
                        help="seconds an inference process with work may stay silent before it is killed as hung "
                             "(env OPTIMAGPT_NODE_HANG_TIMEOUT_S)")
    parser.add_argument("--listen", default=_env("OPTIMAGPT_NODE_LISTEN"), metavar="[HOST]:PORT",
                        help="listen for gateways instead of dialing one, e.g. :8022 (wss with a certificate made "
                             "on first start; the gateway pins it). Env OPTIMAGPT_NODE_LISTEN")
    parser.add_argument("--heartbeat-interval", type=float,
                        default=float(_env("OPTIMAGPT_HEARTBEAT_INTERVAL_S", "2") or 2))
    parser.add_argument("--rescan-interval", type=float, default=5.0)
    parser.add_argument("--metrics-interval", type=float,
                        default=float(_env("OPTIMAGPT_NODE_METRICS_INTERVAL_S", "2") or 2),
                        help="seconds between CPU/RAM/GPU samples sent to the gateway's node console "
                             "(env OPTIMAGPT_NODE_METRICS_INTERVAL_S)")
    parser.add_argument("--ca-file", default=_env("OPTIMAGPT_GATEWAY_CA_FILE"),
                        help="CA bundle to trust for a wss gateway with its own certificate")
    args = parser.parse_args(argv)
    if not 0 <= args.parallel <= 64:
        parser.error("--parallel must be from 0 to 64")

    access_key = _secret("OPTIMAGPT_NODE_ACCESS_KEY") or ""
    if not access_key and not (Path(args.state_dir) / ENROLLED_FILE).exists():
        parser.error("set the node access key in OPTIMAGPT_NODE_ACCESS_KEY or OPTIMAGPT_NODE_ACCESS_KEY_FILE, "
                     "or enroll the node first: python -m node_agent join --gateway-url URL --token TOKEN")
    dirs = args.models_dir or _env_list("OPTIMAGPT_MODELS_DIRS", "models")
    embedding_dirs = args.embedding_models_dir or _env_list("OPTIMAGPT_EMBEDDING_MODELS_DIRS", "")
    enable = args.enable or _env_list("OPTIMAGPT_NODE_ENABLE", "")
    try:
        link_url(args.gateway_url)
    except ValueError as exc:
        parser.error(str(exc))
    listen = None
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--listen must be [HOST]:PORT, got {args.listen!r}")
        listen = (host.strip("[]"), int(port))
    return AgentSettings(
        gateway_url=args.gateway_url,
        access_key=access_key,
        model_dirs=tuple(Path(d).resolve() for d in dirs),
        embedding_model_dirs=tuple(Path(d).resolve() for d in embedding_dirs),
        enable=tuple(enable),
        name=args.name,
        state_dir=Path(args.state_dir),
        threads=args.threads or os.cpu_count() or 1,
        n_ctx=args.ctx,
        parallel=args.parallel,
        n_gpu_layers=args.n_gpu_layers,
        stream_interval_ms=args.stream_interval_ms,
        hang_timeout_s=args.hang_timeout,
        listen=listen,
        heartbeat_interval_s=args.heartbeat_interval,
        rescan_interval_s=args.rescan_interval,
        metrics_interval_s=args.metrics_interval,
        ca_file=args.ca_file,
        access_key_file=os.environ.get("OPTIMAGPT_NODE_ACCESS_KEY_FILE", ""),
    )
