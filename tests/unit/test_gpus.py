"""One GPU catalogue (kiln/gpus.py) feeds what functions may ask for, what nodes recognise in
NVML's names and what each type costs; nothing else lists the types."""

from __future__ import annotations

import re

import pytest

from kiln.billing.prices import DEFAULT_PRICES, parse_prices
from kiln.functions.gpu import GPU_EXPECTED, parse_gpu
from kiln.gpus import CPU_SLOT_PRICE, GPU_TYPES, gpu_type_of
from kiln.settings import Settings


def test_every_type_can_be_asked_for_and_has_a_price() -> None:
    assert [parse_gpu(name.lower()) for name in GPU_TYPES] == list(GPU_TYPES)
    assert set(DEFAULT_PRICES) == {"none", *GPU_TYPES}
    assert DEFAULT_PRICES["none"] == CPU_SLOT_PRICE
    assert Settings.from_env({}).gpu_prices == DEFAULT_PRICES
    assert parse_prices('{"H100": 1}') == {**DEFAULT_PRICES, "H100": 1}


def test_what_is_not_in_the_catalogue_is_refused_with_the_list() -> None:
    with pytest.raises(ValueError, match=re.escape(GPU_EXPECTED)):
        parse_gpu("RTX4090")
    assert ", ".join(GPU_TYPES) in GPU_EXPECTED


@pytest.mark.parametrize(
    ("nvml", "kind"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("Tesla T4", "T4"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GeForce RTX 4090", "GEFORCE-RTX-4090"),
    ],
)
def test_nodes_name_their_cards_by_the_catalogue(nvml: str, kind: str) -> None:
    assert gpu_type_of(nvml) == kind
