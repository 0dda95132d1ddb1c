"""Entry point: `python -m node_agent --gateway-url http://gateway:8000 --models-dir /models`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from . import logship
from .executors import ExecutorManager, NodeDefaults, SettingsStore
from .hardware import Gpus
from .link import Dialer, Listener, load_node_id
from .settings import parse_settings

log = logging.getLogger("node_agent")


async def serve(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    gpus = Gpus()
    n_gpu_layers = settings.n_gpu_layers if settings.n_gpu_layers is not None else (-1 if gpus.present else 0)
    link: Dialer | Listener | None = None

    def executors_changed() -> None:
        if link is not None:
            link.executors_changed()

    defaults = NodeDefaults(n_ctx_cap=settings.n_ctx, threads=settings.threads, n_gpu_layers=n_gpu_layers,
                            parallel=settings.parallel,
                            stream_interval_ms=settings.stream_interval_ms, hang_timeout_s=settings.hang_timeout_s)
    manager = ExecutorManager(dirs=settings.model_dirs, embedding_dirs=settings.embedding_model_dirs,
                              defaults=defaults, store=SettingsStore(settings.state_dir / "executors.json"),
                              enable=settings.enable, on_change=executors_changed)
    kind = Listener if settings.listen else Dialer
    link = kind(settings=settings, node_id=load_node_id(settings.state_dir), manager=manager, gpus=gpus)
    log.info("node %s: models from %s, embedding models from %s, %d threads per model", settings.name,
             ", ".join(map(str, settings.model_dirs)), ", ".join(map(str, settings.embedding_model_dirs)) or "nowhere",
             settings.threads)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(manager.watch(settings.rescan_interval_s, stop))
    linking = asyncio.create_task(link.run_forever())
    await stop.wait()
    log.info("stopping: closing the link and the inference processes")
    linking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await linking
    await watcher
    await manager.stop_all()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["install-service"]:  # the one-time setup as a systemd service (node_agent/service.py)
        from .service import install_node

        install_node(args[1:])
        return
    if args[:1] == ["join"]:  # enroll with a token (node_agent/enroll.py)
        from .enroll import join

        sys.exit(join(args[1:]))
    logging.basicConfig(
        level=os.environ.get("OPTIMAGPT_NODE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger().addHandler(logship.handler)  # the same lines, to the gateway's node console
    asyncio.run(serve(argv))


if __name__ == "__main__":
    main()
