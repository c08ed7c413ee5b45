"""What replica time costs: a price per hour for each GPU type (and for a CPU slot, "none"),
in integer micro-units of the platform's currency, charged per millisecond of a usage report.
`KILN_GPU_PRICES` changes them: JSON such as {"A10G": 1100000}."""

from __future__ import annotations

import json
from collections.abc import Mapping

from kiln.gpus import default_prices

__all__ = ["DEFAULT_PRICES", "cost_micros", "micros_per_minor", "parse_prices", "split_minor"]

# Micro-units per hour per GPU (per CPU slot for "none"), from the GPU catalogue.
DEFAULT_PRICES: Mapping[str, int] = default_prices()
_MS_PER_HOUR = 3_600_000
_MICROS = 1_000_000
# ISO currencies without a minor unit: amounts in them are whole units.
_ZERO_DECIMAL = frozenset(
    ("bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
     "xaf", "xof", "xpf")
)  # fmt: skip


def micros_per_minor(currency: str) -> int:
    """Micro-units in the currency's smallest unit (a cent for usd): what money is paid in."""
    return _MICROS if currency.lower() in _ZERO_DECIMAL else _MICROS // 100


def cost_micros(prices: Mapping[str, int], gpu_type: str, gpu_count: int, duration_ms: int) -> int:
    """The charge for `duration_ms` of a replica holding `gpu_count` of `gpu_type` (rounded
    down to the micro-unit: a report never costs more than its time)."""
    per_hour = prices.get(gpu_type, prices.get("none", 0))
    return per_hour * max(1, gpu_count) * max(0, duration_ms) // _MS_PER_HOUR


def split_minor(amounts: list[int], currency: str) -> list[int]:
    """Amounts in micro-units as whole minor units (cents) that add up to exactly their total
    (itself whole minor units): each rounded down, and the cents left over go to the amounts
    that lost the most (largest remainders)."""
    unit = micros_per_minor(currency)
    total, rest = divmod(sum(amounts), unit)
    if rest:
        raise ValueError(f"the amounts add up to {sum(amounts)} micro-units: not whole {unit}s")
    floors = [amount // unit for amount in amounts]
    short = total - sum(floors)
    losers = sorted(range(len(amounts)), key=lambda i: floors[i] * unit - amounts[i])
    for i in losers[:short]:
        floors[i] += 1
    return floors


def parse_prices(raw: str) -> dict[str, int]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object of GPU types to prices per hour")
    prices = dict(DEFAULT_PRICES)
    for gpu, price in data.items():
        if not isinstance(price, int) or isinstance(price, bool) or price < 0:
            raise ValueError(f"the price of {gpu!r} is {price!r}: expected whole micro-units >= 0")
        prices[str(gpu)] = price
    return prices
