"""What a node offers: GPU slots by type, read through NVML, and CPU slots.

`KILN_NODE_GPUS` overrides the inventory (simulated slots let several node agents on one
machine stand for a GPU cluster in tests and demos).
"""

from __future__ import annotations

import logging
import os

from kiln.gpus import gpu_type_of
from kiln.settings import Settings

__all__ = ["node_slots"]

_log = logging.getLogger(__name__)
_CPU_SLOTS_PER_CORE = 4


def node_slots(settings: Settings) -> dict[str, int]:
    if settings.node_gpus:
        return dict(settings.node_gpus)
    # A GPU host runs CPU functions too. CPU replicas spend most of their life waiting for
    # calls, so cores are oversubscribed.
    return {**_nvml_inventory(), "none": _CPU_SLOTS_PER_CORE * (os.cpu_count() or 1)}


def _nvml_inventory() -> dict[str, int]:
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        _log.info("no NVIDIA GPU usable on this node (%s); offering CPU slots", exc)
        return {}
    try:
        counts: dict[str, int] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            kind = gpu_type_of(name.decode() if isinstance(name, bytes) else str(name))
            counts[kind] = counts.get(kind, 0) + 1
        return counts
    finally:
        pynvml.nvmlShutdown()
