"""What the node's machine has and how busy it is: psutil always, pynvml where an NVIDIA driver exists."""

from __future__ import annotations

import logging
import os
import platform
import warnings
from typing import Any

import psutil

log = logging.getLogger("node_agent.hardware")


class Gpus:
    """NVIDIA GPUs through NVML; an absent driver is normal and means an empty list."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        try:
            with warnings.catch_warnings():
                # The pynvml name is what we install; its deprecation note concerns packaging only.
                warnings.simplefilter("ignore", FutureWarning)
                import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # noqa: BLE001 - pynvml raises its own error types, and ImportError
            log.info("no NVIDIA GPU found (%s)", type(exc).__name__)

    @property
    def present(self) -> bool:
        return bool(self._handles)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for h in self._handles:
            name = self._nvml.nvmlDeviceGetName(h)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"name": name.decode() if isinstance(name, bytes) else name, "vram_total": memory.total})
        return out

    def sample(self) -> list[dict[str, Any]]:
        out = []
        for h in self._handles:
            memory = self._nvml.nvmlDeviceGetMemoryInfo(h)
            util = self._nvml.nvmlDeviceGetUtilizationRates(h)
            out.append({"util_percent": util.gpu, "vram_used": memory.used, "vram_total": memory.total})
        return out


def hardware_info(gpus: Gpus) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "os": f"{platform.system()} {platform.release()}",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "ram_total": memory.total,
        "gpus": gpus.describe(),
    }


def metrics_sample(gpus: Gpus) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "ram_used": memory.total - memory.available,
        "ram_total": memory.total,
        "gpus": gpus.sample(),
    }
