"""How a function asks for GPUs: `"none"`, `"any"`, or a type with an optional count (`"H100:2"`).

The types are kiln/gpus.py's catalogue. The spelling is normalised here, once, so the
scheduler, the node agent and the database compare canonical strings: `"h100:2"` becomes
`"H100:2"` and a count of one is dropped (`"A10G:1"` is `"A10G"`).
"""

from __future__ import annotations

from kiln.gpus import GPU_TYPES

__all__ = ["GPU_EXPECTED", "GPU_TYPES", "MAX_GPU_COUNT", "gpu_request", "parse_gpu"]

MAX_GPU_COUNT = 8

GPU_EXPECTED = (
    f'expected "none", "any" or one of {", ".join(GPU_TYPES)}, optionally with a count '
    f'from 1 to {MAX_GPU_COUNT} such as "H100:2"'
)

_CANONICAL = {kind.lower(): kind for kind in (*GPU_TYPES, "any")}


def parse_gpu(value: object) -> str:
    """The canonical spelling of a GPU request; `ValueError(GPU_EXPECTED)` when it is not one.

    `None` means CPU only, as in Modal.
    """
    if value is None:
        return "none"
    if not isinstance(value, str):
        raise ValueError(GPU_EXPECTED)
    text = value.strip().lower()
    if text == "none":
        return "none"
    kind, sep, count = text.partition(":")
    canonical = _CANONICAL.get(kind)
    if canonical is None:
        raise ValueError(GPU_EXPECTED)
    if not sep:
        return canonical
    # Digits only: int() would also take " 2", "+2", "2_0" and non-ASCII digits.
    if not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= MAX_GPU_COUNT:
        raise ValueError(GPU_EXPECTED)
    return canonical if int(count) == 1 else f"{canonical}:{int(count)}"


def gpu_request(gpu: str) -> tuple[str, int]:
    """A canonical request as (slot kind, count): "none" → ("none", 1), "any" → ("any", 1),
    "H100:2" → ("H100", 2)."""
    kind, _, count = gpu.partition(":")
    return (kind if kind in ("none", "any") else kind.upper()), int(count or 1)
