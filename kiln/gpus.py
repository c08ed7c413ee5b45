"""The GPU types Kiln knows, in one catalogue: what a function may ask for (`gpu="H100:2"`),
what a node agent recognises in NVML's names, and what an hour of each costs by default.

A type outside it can still run: a node reports an unknown card under a cleaned-up version of
its NVML name and bills it at the CPU slot's price until `KILN_GPU_PRICES` names it; functions
cannot ask for it by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CPU_SLOT_PRICE", "GPUS", "GPU_TYPES", "GpuType", "default_prices", "gpu_type_of"]


@dataclass(frozen=True)
class GpuType:
    name: str
    # Micro-units of the platform's currency per hour, per GPU (KILN_GPU_PRICES overrides).
    price_per_hour: int
    memory_gb: int  # of one card, as sold (what a model must fit in)
    # The words of NVML's name that identify it ("NVIDIA A100-SXM4-80GB" → A100 and 80GB).
    nvml_words: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        return self.nvml_words or (self.name,)


GPUS: tuple[GpuType, ...] = (
    GpuType("T4", 600_000, 16),
    GpuType("L4", 800_000, 24),
    GpuType("A10G", 1_100_000, 24),
    GpuType("A100", 2_500_000, 40),
    GpuType("A100-80GB", 3_400_000, 80, ("A100", "80GB")),
    GpuType("L40S", 1_900_000, 48),
    GpuType("H100", 3_900_000, 80),
    GpuType("H200", 4_500_000, 141),
    GpuType("B200", 6_250_000, 180),
)
GPU_TYPES: tuple[str, ...] = tuple(gpu.name for gpu in GPUS)
# An hour of one CPU slot (slot kind "none").
CPU_SLOT_PRICE = 50_000


def default_prices() -> dict[str, int]:
    """Prices per hour by slot kind: each GPU type's and the CPU slot's ("none")."""
    return {"none": CPU_SLOT_PRICE, **{gpu.name: gpu.price_per_hour for gpu in GPUS}}


# The most specific match first: "A100 80GB" is an A100-80GB before it is an A100.
_BY_SPECIFICITY = sorted(GPUS, key=lambda gpu: -len(gpu.words))


def gpu_type_of(nvml_name: str) -> str:
    """The catalogue's type for an NVML name ("NVIDIA H100 80GB HBM3" → "H100"); an unknown
    card keeps a cleaned-up version of its name."""
    upper = nvml_name.upper()
    for gpu in _BY_SPECIFICITY:
        if all(re.search(rf"\b{re.escape(word)}\b", upper) for word in gpu.words):
            return gpu.name
    return re.sub(r"[^A-Z0-9-]+", "-", upper.removeprefix("NVIDIA ")).strip("-")[:32] or "GPU"
