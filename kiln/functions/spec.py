"""What a deployed function is, as data: the contract between the SDK, `kiln deploy`, the router,
the scheduler and the replicas.

A *function* here is the unit that is deployed, scaled and billed: either a plain function or a
class. A class's methods are its entry points (`APP/Class.method`); they share the class's
replicas, so a model loaded in `@kiln.enter` serves every method. Specs travel as JSON
(`to_dict` / `from_dict`) with a format version.

Standard library only: the SDK, the CLI and the router all import this module.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "SPEC_VERSION",
    "CallKind",
    "CallSpec",
    "FunctionSpec",
    "Resources",
    "UnitKind",
]

SPEC_VERSION = 1


class UnitKind(enum.StrEnum):
    FUNCTION = "function"
    CLASS = "class"


class CallKind(enum.StrEnum):
    """How one entry point is called. The values match `kiln.db.enums.FunctionKind`."""

    FUNCTION = "function"  # one reply per call
    GENERATOR = "generator"  # a stream of chunks per call
    WEBSOCKET = "websocket"  # a bidirectional session


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Scaling and resource settings of a function or class (names as in design.md, seconds
    in fields ending with `_s`)."""

    gpu: str = "none"
    min_replicas: int = 0
    max_replicas: int = 4
    buffer_replicas: int = 0
    idle_timeout_s: int = 300
    concurrency: int = 1
    target_concurrency: int = 1
    timeout_s: int = 300
    startup_timeout_s: int = 600
    retries: int = 0
    memory_mb: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    # Classes: "shared" (restore a read-only mapping of the snapshot), "private" (a writable
    # copy) or "off" (run the @enter(snap=True) hooks in every replica).
    snapshot: str = "shared"
    # The fields the developer wrote in the decorator (the others are defaults). A redeploy
    # replaces an operator's live scaling change only with a value written here; see
    # `kiln.router.deploy`. Provenance, not a setting: equality ignores it.
    explicit: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, kw_only=True)
class CallSpec:
    """One entry point: a plain function, or one method of a class."""

    name: str
    kind: CallKind = CallKind.FUNCTION
    is_async: bool = False
    # The Python signature without `self`, e.g. "(text: str, loud: bool = False) -> str", shown
    # when a call's arguments do not match.
    signature: str = "()"
    # The inference task the entry serves behind the OpenAI-compatible routes
    # (`kiln.functions.tasks.Task`'s value), or None for an ordinary entry point.
    task: str | None = None


@dataclass(frozen=True, kw_only=True)
class FunctionSpec:
    name: str  # the function's or the class's name
    kind: UnitKind
    resources: Resources
    # A plain function has exactly one entry, under its own name; a class has one per method.
    entries: dict[str, CallSpec]

    def entry(self, method: str | None) -> CallSpec | None:
        """The entry point that `APP/NAME` (method None) or `APP/NAME.method` addresses."""
        if self.kind is UnitKind.FUNCTION:
            return self.entries.get(self.name) if method is None else None
        return self.entries.get(method) if method is not None else None

    def tasks(self) -> dict[str, str]:
        """The entries that serve an inference task: method (or function name) to task."""
        return {key: entry.task for key, entry in self.entries.items() if entry.task}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["resources"]["secrets"] = list(self.resources.secrets)
        data["resources"]["explicit"] = list(self.resources.explicit)
        return {"version": SPEC_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunctionSpec:
        if data.get("version") != SPEC_VERSION:
            raise ValueError(
                f"function spec version {data.get('version')!r} is not supported; this Kiln "
                f"reads version {SPEC_VERSION} (redeploy with a matching kiln)"
            )
        resources = dict(data["resources"])
        resources["secrets"] = tuple(resources.get("secrets", ()))
        resources["explicit"] = tuple(resources.get("explicit", ()))
        return cls(
            name=data["name"],
            kind=UnitKind(data["kind"]),
            resources=Resources(**resources),
            entries={
                key: CallSpec(
                    name=entry["name"],
                    kind=CallKind(entry["kind"]),
                    is_async=entry["is_async"],
                    signature=entry["signature"],
                    task=entry.get("task"),
                )
                for key, entry in data["entries"].items()
            },
        )
