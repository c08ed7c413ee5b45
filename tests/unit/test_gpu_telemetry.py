"""GPU telemetry through a fake NVML (the GPU is one of the project's deliberate seams): values
appear with node, GPU and replica labels; the replica label follows the GPU's holder and old
series go; readings a GPU lacks are left out; a GPU that fails is skipped and logged once;
a node without NVML logs one line and exports nothing; a hung NVML never stalls the loop."""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from pathlib import Path
from typing import Any, cast

import pytest
from eventually import eventually
from prometheus_client import CollectorRegistry

from kiln._tasks import cancel_and_wait
from kiln.invoker.agent import NodeAgent, _Running
from kiln.observability.gpu import (
    EccKind,
    GpuTelemetry,
    NvmlError,
    NvmlNotSupported,
    Pynvml,
)
from kiln.settings import Settings

GIB = 1024**3


class FakeNvml:
    """Two GPUs (by default) with fixed readings; tests change them, or make them fail."""

    def __init__(self, count: int = 2, *, init_error: str | None = None) -> None:
        self.count = count
        self.init_error = init_error
        self.utilization = {i: 10.0 * (i + 1) for i in range(count)}
        self.no_ecc: set[int] = set()
        self.broken: set[int] = set()
        self.hang = threading.Event()  # set: readings block until `release` is set
        self.release = threading.Event()
        self.calls: list[str] = []

    def init(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise NvmlError(self.init_error)

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def device_count(self) -> int:
        return self.count

    def _check(self, index: int) -> None:
        if self.hang.is_set():
            self.release.wait(10)
        if index in self.broken:
            raise NvmlError("GPU is lost")

    def utilization_percent(self, index: int) -> float:
        self._check(index)
        return self.utilization[index]

    def memory_bytes(self, index: int) -> tuple[int, int]:
        self._check(index)
        return (index + 1) * GIB, 80 * GIB

    def temperature_celsius(self, index: int) -> float:
        self._check(index)
        return 40.0 + index

    def power_watts(self, index: int) -> float:
        self._check(index)
        return 300.5 + index

    def ecc_errors(self, index: int, kind: EccKind) -> int:
        self._check(index)
        if index in self.no_ecc:
            raise NvmlNotSupported("Not Supported")
        return 0 if kind is EccKind.CORRECTED else 2


def telemetry(
    nvml: FakeNvml, holders: dict[int, str] | None = None, interval_s: float = 1.0
) -> GpuTelemetry:
    held = holders if holders is not None else {}
    return GpuTelemetry("node-a", lambda: held, interval_s=interval_s, nvml=nvml)


def value(t: GpuTelemetry, name: str, gpu: int, replica: str = "", **extra: str) -> float | None:
    labels = {"node": "node-a", "gpu": str(gpu), "replica": replica, **extra}
    return t.registry.get_sample_value(name, labels)


def series(registry: CollectorRegistry, prefix: str = "kiln_gpu_") -> list[dict[str, str]]:
    return [
        {"name": s.name, **s.labels}
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith(prefix)
    ]


async def test_each_gpu_reading_appears_with_node_gpu_and_replica_labels() -> None:
    nvml = FakeNvml()
    t = telemetry(nvml, {0: "replica-1"})
    assert await t.open()
    await t.sample()

    assert value(t, "kiln_gpu_utilization_ratio", 0, "replica-1") == pytest.approx(0.10)
    assert value(t, "kiln_gpu_utilization_ratio", 1) == pytest.approx(0.20)
    assert value(t, "kiln_gpu_memory_used_bytes", 1) == 2 * GIB
    assert value(t, "kiln_gpu_memory_total_bytes", 0, "replica-1") == 80 * GIB
    assert value(t, "kiln_gpu_temperature_celsius", 1) == 41.0
    assert value(t, "kiln_gpu_power_watts", 0, "replica-1") == 300.5
    assert value(t, "kiln_gpu_ecc_errors", 0, "replica-1", type="uncorrected") == 2
    assert value(t, "kiln_gpu_ecc_errors", 1, type="corrected") == 0
    # Six gauges (ECC twice) for each of two GPUs, nothing else.
    assert len(series(t.registry)) == 2 * 7


async def test_the_replica_label_follows_the_holder_and_old_series_go() -> None:
    nvml = FakeNvml()
    holders = {0: "replica-1"}
    t = telemetry(nvml, holders)
    assert await t.open()
    await t.sample()
    holders.clear()
    holders[1] = "replica-2"  # replica-1 exited; replica-2 took GPU 1
    nvml.utilization[1] = 95.0
    await t.sample()

    assert value(t, "kiln_gpu_utilization_ratio", 0, "replica-1") is None
    assert value(t, "kiln_gpu_ecc_errors", 0, "replica-1", type="corrected") is None
    assert value(t, "kiln_gpu_utilization_ratio", 0) == pytest.approx(0.10)
    assert value(t, "kiln_gpu_utilization_ratio", 1) is None
    assert value(t, "kiln_gpu_utilization_ratio", 1, "replica-2") == pytest.approx(0.95)
    assert {s["replica"] for s in series(t.registry)} == {"", "replica-2"}
    assert len(series(t.registry)) == 2 * 7


async def test_a_gpu_without_ecc_has_no_ecc_series_and_the_rest_of_its_readings() -> None:
    nvml = FakeNvml()
    nvml.no_ecc.add(1)
    t = telemetry(nvml)
    assert await t.open()
    await t.sample()

    ecc = [s for s in series(t.registry, "kiln_gpu_ecc_errors")]
    assert sorted((s["gpu"], s["type"]) for s in ecc) == [("0", "corrected"), ("0", "uncorrected")]
    assert value(t, "kiln_gpu_temperature_celsius", 1) == 41.0
    assert value(t, "kiln_gpu_power_watts", 1) == 301.5


async def test_a_gpu_that_fails_is_skipped_and_logged_once_until_it_reads_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = FakeNvml()
    t = telemetry(nvml)
    assert await t.open()
    await t.sample()
    nvml.broken.add(1)
    with caplog.at_level("INFO", logger="kiln.gpu"):
        for _ in range(3):
            await t.sample()

    failures = [r for r in caplog.records if "reading failed" in r.getMessage()]
    assert len(failures) == 1
    assert "GPU 1 on node node-a" in failures[0].getMessage()
    assert "GPU is lost" in failures[0].getMessage()
    assert {s["gpu"] for s in series(t.registry)} == {"0"}  # no stale values for GPU 1
    assert value(t, "kiln_gpu_utilization_ratio", 0) == pytest.approx(0.10)

    nvml.broken.clear()
    await t.sample()
    assert value(t, "kiln_gpu_utilization_ratio", 1) == pytest.approx(0.20)


@pytest.mark.parametrize(
    ("nvml", "reason"),
    [
        (FakeNvml(init_error="NVML Shared Library Not Found"), "NVML Shared Library Not Found"),
        (FakeNvml(init_error="Driver Not Loaded"), "Driver Not Loaded"),
        (FakeNvml(count=0), "NVML finds no GPU"),
    ],
)
async def test_a_node_without_a_usable_gpu_logs_one_line_and_exports_nothing(
    nvml: FakeNvml, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    t = telemetry(nvml)
    with caplog.at_level("DEBUG", logger="kiln.gpu"):
        await asyncio.wait_for(t.run(), 5)  # returns at once rather than sampling

    assert [r.getMessage() for r in caplog.records] == [
        f"no GPU telemetry on node node-a: {reason}"
        if reason == "NVML finds no GPU"
        else f"no GPU telemetry on node node-a: NVML is not usable ({reason})"
    ]
    assert caplog.records[0].levelname == "INFO"
    assert series(t.registry) == []


async def test_without_pynvml_the_seam_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # an import of it now fails
    with pytest.raises(NvmlError, match="pynvml is not installed"):
        Pynvml().init()


def _stub_pynvml(not_supported: set[str]) -> types.ModuleType:
    """The few pynvml names `Pynvml` uses, with NVML's error convention (a value per error)."""
    stub = types.ModuleType("pynvml")

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__("Not Supported" if value == 3 else "Unknown Error")
            self.value = value

    def answer(name: str, result: Any) -> Any:
        def call(*args: Any) -> Any:
            if name in not_supported:
                raise NVMLError(3)
            if name == "broken":
                raise NVMLError(999)
            return result

        return call

    handle = object()
    stub.__dict__.update(
        NVMLError=NVMLError, NVML_ERROR_NOT_SUPPORTED=3, NVML_TEMPERATURE_GPU=0,
        NVML_MEMORY_ERROR_TYPE_CORRECTED=0, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0,
        nvmlInit=answer("nvmlInit", None), nvmlShutdown=answer("nvmlShutdown", None),
        nvmlDeviceGetCount=answer("nvmlDeviceGetCount", 1),
        nvmlDeviceGetHandleByIndex=answer("nvmlDeviceGetHandleByIndex", handle),
        nvmlDeviceGetUtilizationRates=answer(
            "nvmlDeviceGetUtilizationRates", types.SimpleNamespace(gpu=37, memory=5)),
        nvmlDeviceGetMemoryInfo=answer(
            "nvmlDeviceGetMemoryInfo", types.SimpleNamespace(used=GIB, total=24 * GIB, free=0)),
        nvmlDeviceGetTemperature=answer("nvmlDeviceGetTemperature", 55),
        nvmlDeviceGetPowerUsage=answer("nvmlDeviceGetPowerUsage", 123_456),
        nvmlDeviceGetTotalEccErrors=answer("nvmlDeviceGetTotalEccErrors", 0),
        nvmlDeviceGetName=answer("nvmlDeviceGetName", "NVIDIA A10G"),
    )  # fmt: skip
    return stub


async def test_pynvml_readings_in_kiln_units_and_not_supported_told_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _stub_pynvml({"nvmlDeviceGetTotalEccErrors"}))
    t = GpuTelemetry("node-a", dict, interval_s=1.0, nvml=Pynvml())
    assert await t.open()
    await t.sample()

    assert value(t, "kiln_gpu_utilization_ratio", 0) == pytest.approx(0.37)
    assert value(t, "kiln_gpu_power_watts", 0) == pytest.approx(123.456)  # NVML's milliwatts
    assert value(t, "kiln_gpu_memory_used_bytes", 0) == GIB
    assert series(t.registry, "kiln_gpu_ecc_errors") == []


async def test_a_hung_nvml_times_out_logs_once_and_never_piles_up_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = FakeNvml()
    t = telemetry(nvml, interval_s=1.0)
    assert await t.open()
    await t.sample()
    nvml.hang.set()
    try:
        with caplog.at_level("WARNING", logger="kiln.gpu"):
            await asyncio.wait_for(t.sample(), 5)  # gives up after its 1 s timeout
            await asyncio.wait_for(t.sample(), 0.5)  # the stuck reading is still out: skip
        assert [r.getMessage() for r in caplog.records] == [
            "GPU telemetry on node node-a: NVML does not answer"
        ]
        t.close()
        assert "shutdown" not in nvml.calls  # not under a reading still in NVML
    finally:
        nvml.release.set()
    nvml.hang.clear()
    nvml.utilization[0] = 55.0

    async def reads_again() -> bool:  # once the stuck reading has returned
        await t.sample()
        return bool(value(t, "kiln_gpu_utilization_ratio", 0) == pytest.approx(0.55))

    await eventually(reads_again, within_s=5)


async def test_run_samples_until_cancelled_then_shuts_nvml_down() -> None:
    nvml = FakeNvml()
    t = telemetry(nvml, interval_s=1.0)
    running = asyncio.create_task(t.run())
    await eventually(lambda: series(t.registry), within_s=2, every_s=0.02)
    assert len(series(t.registry)) == 2 * 7
    await cancel_and_wait(running)
    assert nvml.calls == ["init", "shutdown"]


def test_the_node_agent_labels_gpus_with_the_replicas_it_gave_them_to(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"HOME": str(tmp_path), "KILN_NODE_GPUS": "A10G:2,none:2", "KILN_SNAPSHOTS": "off"}
    )
    agent = NodeAgent(settings, cast(Any, None))

    def running(gpu_type: str, indices: list[int]) -> _Running:
        return _Running(cast(Any, None), cast(Any, None), gpu_type, indices)

    agent.replicas["on-gpu"] = running("A10G", [1])
    agent.replicas["on-cpu"] = running("none", [0])
    assert agent._gpu_holders() == {1: "on-gpu"}
    assert agent.gpu_telemetry.registry is agent.metrics_registry
    assert agent.gpu_telemetry.interval_s == settings.gpu_sample_interval_s == 5.0
