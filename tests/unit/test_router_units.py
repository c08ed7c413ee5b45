"""Router pieces with no services behind them: body classification and node slot accounting."""

from __future__ import annotations

import pytest

from kiln.errors import InvalidJson
from kiln.functions.gpu import gpu_request
from kiln.invoker.agent import _Slots
from kiln.invoker.inventory import gpu_type_of
from kiln.router.run import classify


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"", "", (b"{}", "application/json")),
        (b'{"a": 1}', "application/json", (b'{"a": 1}', "application/json")),
        (b'{"a": 1}', "application/x-www-form-urlencoded", (b'{"a": 1}', "application/json")),
        (b"not json", "text/plain", (b"not json", "application/octet-stream")),
        (b"\x00\x01", "application/octet-stream", (b"\x00\x01", "application/octet-stream")),
        (b"[1, 2]", "application/vnd.kiln+json", (b"[1, 2]", "application/json")),
    ],
)
def test_classify(body: bytes, content_type: str, expected: tuple[bytes, str]) -> None:
    assert classify(body, content_type) == expected


def test_declared_json_must_parse() -> None:
    with pytest.raises(InvalidJson, match=r"^the body is not valid JSON: "):
        classify(b"{oops", "application/json; charset=utf-8")


def test_slots_are_taken_and_returned() -> None:
    slots = _Slots({"A10G": 2, "none": 1})
    assert slots.take("A10G:2") == ("A10G", [0, 1])
    assert slots.take("A10G") is None
    assert slots.take("any") is None  # no GPU left; CPU slots never count as "any"
    assert slots.take("none") == ("none", [0])
    slots.give_back("A10G", [1, 0])
    assert slots.take("any") == ("A10G", [0])


def test_gpu_requests_and_names() -> None:
    assert gpu_request("h100:2") == ("H100", 2)
    assert gpu_request("none") == ("none", 1)
    assert gpu_type_of("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_type_of("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert gpu_type_of("NVIDIA A10G") == "A10G"


def test_a_gpu_host_offers_cpu_slots_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.invoker import inventory
    from kiln.settings import Settings

    monkeypatch.setattr(inventory, "_nvml_inventory", lambda: {"H100": 8})
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    slots = inventory.node_slots(Settings.from_env({"HOME": "/h"}))
    assert slots == {"H100": 8, "none": 64}
    simulated = Settings.from_env({"HOME": "/h", "KILN_NODE_GPUS": "A10G:2"})
    assert inventory.node_slots(simulated) == {"A10G": 2}
