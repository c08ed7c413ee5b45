"""GPU telemetry: the node agent reads each GPU through NVML every few seconds
(`KILN_GPU_SAMPLE_INTERVAL_S`) and exports utilisation, memory, temperature, power and ECC
error counts as Prometheus gauges labelled by node, GPU index and the replica holding the GPU.

NVML is reached through one seam, `Nvml`: `Pynvml` wraps the pynvml functions used here, and
tests pass a fake. NVML calls block (a wedged driver can hang them for seconds), so every
reading runs in a worker thread under a timeout, and a new one starts only when the last has
returned. A node without a GPU, a driver or pynvml logs one line and exports nothing. A reading
a GPU does not offer (ECC on consumer cards, power on some boards) is left out for that GPU; a
GPU whose reading fails is skipped, with one log line until it reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Gauge

__all__ = [
    "EccKind",
    "GpuTelemetry",
    "Nvml",
    "NvmlError",
    "NvmlNotSupported",
    "Pynvml",
]

_log = logging.getLogger("kiln.gpu")
_T = TypeVar("_T")
# NVML's first call loads the driver's state, which takes seconds on hosts without persistence
# mode; later readings take microseconds per GPU.
_OPEN_TIMEOUT_S = 30.0


class NvmlError(Exception):
    """An NVML call failed (or NVML cannot be used at all)."""


class NvmlNotSupported(NvmlError):
    """This GPU does not offer that reading."""


class EccKind(enum.StrEnum):
    CORRECTED = "corrected"
    UNCORRECTED = "uncorrected"


class Nvml(Protocol):
    """The NVML calls GPU telemetry makes; each raises `NvmlError` when it fails and
    `NvmlNotSupported` when the GPU lacks the reading."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def device_count(self) -> int: ...
    def utilization_percent(self, index: int) -> float: ...
    def memory_bytes(self, index: int) -> tuple[int, int]:
        """(used, total)."""
        ...

    def temperature_celsius(self, index: int) -> float: ...
    def power_watts(self, index: int) -> float: ...
    def ecc_errors(self, index: int, kind: EccKind) -> int:
        """Volatile counts: since the driver last loaded."""
        ...


class Pynvml:
    """`Nvml` through the pynvml module (nvidia-ml-py), imported only when first used."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: dict[int, Any] = {}

    def init(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlError("pynvml is not installed (it comes with kiln[worker])") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlError(str(exc)) from exc
        self._nvml = pynvml

    def shutdown(self) -> None:
        self._handles.clear()
        if self._nvml is not None:
            self._call("nvmlShutdown")
            self._nvml = None

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def utilization_percent(self, index: int) -> float:
        return float(self._on(index, "nvmlDeviceGetUtilizationRates").gpu)

    def memory_bytes(self, index: int) -> tuple[int, int]:
        memory = self._on(index, "nvmlDeviceGetMemoryInfo")
        return int(memory.used), int(memory.total)

    def temperature_celsius(self, index: int) -> float:
        return float(self._on(index, "nvmlDeviceGetTemperature", self._nvml.NVML_TEMPERATURE_GPU))

    def power_watts(self, index: int) -> float:
        return float(self._on(index, "nvmlDeviceGetPowerUsage")) / 1000  # NVML says milliwatts

    def ecc_errors(self, index: int, kind: EccKind) -> int:
        error_type = (
            self._nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
            if kind is EccKind.CORRECTED
            else self._nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        )
        return int(
            self._on(index, "nvmlDeviceGetTotalEccErrors", error_type, self._nvml.NVML_VOLATILE_ECC)
        )

    def _on(self, index: int, function: str, *args: Any) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = self._handles[index] = self._call("nvmlDeviceGetHandleByIndex", index)
        return self._call(function, handle, *args)

    def _call(self, function: str, *args: Any) -> Any:
        nvml = self._nvml
        try:
            return getattr(nvml, function)(*args)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_NOT_SUPPORTED:
                raise NvmlNotSupported(str(exc)) from exc
            raise NvmlError(str(exc)) from exc


@dataclass
class _Reading:
    """One GPU at one moment; None: the GPU does not offer it."""

    index: int
    utilization: float | None = None
    memory: tuple[int, int] | None = None
    temperature: float | None = None
    power: float | None = None
    ecc: dict[EccKind, int | None] = field(default_factory=dict)
    error: str | None = None  # the reading failed; nothing else is set


class _Busy(Exception):
    """The previous NVML call has not returned yet."""


class GpuTelemetry:
    def __init__(
        self,
        node: str,
        holders: Callable[[], Mapping[int, str]],
        *,
        interval_s: float,
        registry: CollectorRegistry | None = None,
        nvml: Nvml | None = None,
    ) -> None:
        """`holders()`: GPU index -> id of the replica holding it (free GPUs are absent)."""
        self.node = node
        self.holders = holders
        self.interval_s = interval_s
        self.nvml: Nvml = nvml if nvml is not None else Pynvml()
        self.registry = registry or CollectorRegistry()
        self.count = 0
        self._thread: asyncio.Future[Any] | None = None
        self._labels: dict[int, tuple[str, str, str]] = {}  # each GPU's current series
        self._failing: set[int] = set()  # GPUs whose failure was logged, until they read again
        self._stalled = False
        labels = ["node", "gpu", "replica"]

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*labels, *extra], registry=self.registry)

        self.utilization = gauge(
            "kiln_gpu_utilization_ratio",
            "Fraction of the last sample period in which a kernel ran on the GPU (0 to 1).",
        )
        self.memory_used = gauge("kiln_gpu_memory_used_bytes", "GPU memory in use.")
        self.memory_total = gauge("kiln_gpu_memory_total_bytes", "GPU memory in all.")
        self.temperature = gauge("kiln_gpu_temperature_celsius", "GPU core temperature.")
        self.power = gauge("kiln_gpu_power_watts", "GPU power draw.")
        self.ecc = gauge(
            "kiln_gpu_ecc_errors",
            "ECC memory errors since the driver loaded, by type (corrected, uncorrected); absent "
            "for GPUs without ECC.",
            ("type",),
        )
        self._per_gpu = (
            self.utilization, self.memory_used, self.memory_total, self.temperature, self.power
        )  # fmt: skip

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled; return at once when NVML is unusable."""
        if not await self.open():
            return
        try:
            while True:
                await self.sample()
                await asyncio.sleep(self.interval_s)
        finally:
            self.close()

    async def open(self) -> bool:
        """Start NVML; False (logged once) when this node has no GPU it can read."""
        try:
            self.count = await self._in_thread(self._open, _OPEN_TIMEOUT_S)
        except (NvmlError, TimeoutError, _Busy) as exc:
            reason = str(exc) or f"NVML did not answer within {_OPEN_TIMEOUT_S:g} s"
            _log.info("no GPU telemetry on node %s: NVML is not usable (%s)", self.node, reason)
            return False
        if self.count == 0:
            _log.info("no GPU telemetry on node %s: NVML finds no GPU", self.node)
            self.close()
            return False
        _log.info(
            "GPU telemetry on node %s: %d GPU(s), read every %g s",
            self.node, self.count, self.interval_s,
        )  # fmt: skip
        return True

    def close(self) -> None:
        # Not while a reading still runs in its thread: NVML would be shut under it.
        if self._thread is None or self._thread.done():
            with contextlib.suppress(NvmlError):
                self.nvml.shutdown()

    async def sample(self) -> None:
        """Read every GPU once and update the gauges."""
        try:
            readings = await self._in_thread(self._read_all, max(self.interval_s, 1.0))
        except (TimeoutError, _Busy):
            if not self._stalled:
                _log.warning("GPU telemetry on node %s: NVML does not answer", self.node)
            self._stalled = True
            return
        self._stalled = False
        holders = self.holders()
        for reading in readings:
            self._record(reading, holders.get(reading.index, ""))

    def _open(self) -> int:
        self.nvml.init()
        try:
            return self.nvml.device_count()
        except NvmlError:
            self.nvml.shutdown()
            raise

    async def _in_thread(self, read: Callable[[], _T], timeout_s: float) -> _T:
        """`read()` in a worker thread, waiting at most `timeout_s`; a thread that overruns
        keeps running (threads cannot be stopped) and no other starts until it returns."""
        if self._thread is not None and not self._thread.done():
            raise _Busy
        thread = self._thread = asyncio.ensure_future(asyncio.to_thread(read))
        # Its outcome is read below or, if it overruns, dropped here (never left unretrieved).
        thread.add_done_callback(lambda done: done.cancelled() or done.exception())
        finished, _ = await asyncio.wait({thread}, timeout=timeout_s)
        if not finished:
            raise TimeoutError
        result: _T = thread.result()
        return result

    def _read_all(self) -> list[_Reading]:
        """In the worker thread: plain values, no Prometheus objects."""
        readings = []
        for index in range(self.count):
            try:
                readings.append(self._read(index))
            except NvmlError as exc:
                readings.append(_Reading(index, error=str(exc) or type(exc).__name__))
        return readings

    def _read(self, index: int) -> _Reading:
        nvml = self.nvml
        utilization = _unless_unsupported(nvml.utilization_percent, index)
        return _Reading(
            index,
            utilization=None if utilization is None else utilization / 100,
            memory=_unless_unsupported(nvml.memory_bytes, index),
            temperature=_unless_unsupported(nvml.temperature_celsius, index),
            power=_unless_unsupported(nvml.power_watts, index),
            ecc={kind: _unless_unsupported(nvml.ecc_errors, index, kind) for kind in EccKind},
        )

    def _record(self, reading: _Reading, replica: str) -> None:
        index = reading.index
        labels = (self.node, str(index), replica)
        old = self._labels.get(index)
        if old is not None and old != labels:
            self._forget(old)  # a new holder: the old replica's series go, the set stays bounded
        if reading.error is not None:
            if index not in self._failing:
                _log.warning(
                    "GPU %d on node %s: NVML reading failed (%s); skipping it until it reads "
                    "again", index, self.node, reading.error,
                )  # fmt: skip
                self._failing.add(index)
            self._forget(labels)  # no stale values for a GPU that cannot be read
            self._labels.pop(index, None)
            return
        if index in self._failing:
            self._failing.discard(index)
            _log.info("GPU %d on node %s reads again", index, self.node)
        self._labels[index] = labels
        used, total = reading.memory if reading.memory is not None else (None, None)
        _put(self.utilization, labels, reading.utilization)
        _put(self.memory_used, labels, used)
        _put(self.memory_total, labels, total)
        _put(self.temperature, labels, reading.temperature)
        _put(self.power, labels, reading.power)
        for kind in EccKind:
            _put(self.ecc, (*labels, kind.value), reading.ecc.get(kind))

    def _forget(self, labels: tuple[str, str, str]) -> None:
        for gauge in self._per_gpu:
            _remove(gauge, labels)
        for kind in EccKind:
            _remove(self.ecc, (*labels, kind.value))


def _unless_unsupported(read: Callable[..., _T], *args: Any) -> _T | None:
    try:
        return read(*args)
    except NvmlNotSupported:
        return None


def _put(gauge: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    if value is None:
        _remove(gauge, labels)
    else:
        gauge.labels(*labels).set(value)


def _remove(gauge: Gauge, labels: tuple[str, ...]) -> None:
    # Older prometheus_client versions raise KeyError for a series that is not there.
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
