"""What a node offers: GPU slots by type, read through NVML, and CPU slots.

`KILN_NODE_GPUS` overrides the inventory (simulated slots let several node agents on one
machine stand for a GPU cluster in tests and demos).
"""

from __future__ import annotations

import logging
import os
import re

from kiln.settings import Settings

__all__ = ["gpu_type_of", "node_slots"]

_log = logging.getLogger(__name__)
_CPU_SLOTS_PER_CORE = 4
# NVML reports marketing names ("NVIDIA H100 80GB HBM3"); Kiln schedules by short type.
_KNOWN = ("B200", "H200", "H100", "L40S", "A100", "A10G", "L4", "T4")


def gpu_type_of(nvml_name: str) -> str:
    upper = nvml_name.upper()
    for known in _KNOWN:
        if re.search(rf"\b{known}\b", upper):
            if known == "A100" and "80GB" in upper:
                return "A100-80GB"
            return known
    return re.sub(r"[^A-Z0-9-]+", "-", upper.removeprefix("NVIDIA ")).strip("-")[:32] or "GPU"


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
