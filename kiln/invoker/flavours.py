"""Standby flavours: which modules a node's standby processes import ahead of time, and how many
of each to keep ready.

A *need* is what one function's replicas need imported before they serve, learned per function
(its code digest and name, the snapshot's affinity id): the modules its snapshot's manifest lists
(`kiln.snapshots.imports`), plus whatever its replicas still had to import after assignment,
together with the function's `env` (modules read environment variables when they are imported,
so a standby imports under the env of the function it will become).

A *flavour* is what a standby imports (beyond `KILN_STANDBY_IMPORTS`). It *covers* a need with
the same env whose every module is among its own or their packages. Needs covered by another
need's flavour share it: functions built on the same library share standbys, and each distinct
import set gets one flavour, at most `max_flavours` of them, the most recently used first.

Depth follows demand: each function keeps enough standbys of its flavour for the largest burst
of its cold starts seen recently (several replicas at once), and one more than the cold starts
its current pace brings while a standby refills, or one when its cold starts are rare; a
flavour keeps what its functions call for together (they may cold-start at the same moment).
The plan is a pure function of the needs and the times of their cold starts (the agent passes
its clock).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.snapshots.imports import expand, leaves, module_names

__all__ = ["BASE", "Demand", "Flavour", "depth"]

# Cold starts counted for a flavour's rate, and the history kept per need.
RATE_WINDOW_S = 300.0
_HISTORY = 64
# The pace of cold starts is that of the last few.
_PACE_STARTS = 4
_UNLIKELY = 0.25
# The most standbys of one flavour a plan asks for, whatever the bursts.
MAX_DEPTH = 8
# Functions remembered per node (the least recently seen are forgotten first).
MAX_NEEDS = 256


@dataclass(frozen=True)
class Flavour:
    imports: tuple[str, ...] = ()  # leaves, sorted
    env: tuple[tuple[str, str], ...] = ()  # sorted items

    @classmethod
    def of(cls, imports: Iterable[str], env: Mapping[str, str] | None = None) -> Flavour:
        return cls(leaves(imports), tuple(sorted((env or {}).items())))

    @functools.cached_property
    def id(self) -> str:
        text = json.dumps([self.imports, self.env], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @functools.cached_property
    def modules(self) -> frozenset[str]:
        """Every module a standby of this flavour has imported (its leaves and their parents)."""
        return expand(self.imports)

    def covers(self, need: Flavour) -> bool:
        return need.env == self.env and need.modules <= self.modules

    def describe(self) -> str:
        more = f",+{len(self.imports) - 3}" if len(self.imports) > 3 else ""
        shown = ",".join(self.imports[:3]) + more
        env = f" env={len(self.env)}" if self.env else ""
        return f"{self.id}[{shown or 'base'}]{env}"


BASE = Flavour()


@dataclass
class _Need:
    flavour: Flavour
    gpu: bool
    seen: float  # when it was last learned or started
    starts: deque[float] = field(default_factory=lambda: deque(maxlen=_HISTORY))


class Demand:
    """What the cold starts on one node needed, and when they happened."""

    def __init__(self, limit: int = MAX_NEEDS) -> None:
        self.limit = limit
        self.needs: dict[str, _Need] = {}

    def started(self, key: str, env: Mapping[str, str], *, gpu: bool, now: float) -> None:
        """A cold start of the function `key` (an affinity id) began on this node."""
        need = self._need(key, env, gpu=gpu, now=now)
        need.starts.append(now)

    def learn(self, key: str, imports: Iterable[str], *, now: float) -> bool:
        """Add `imports` to what the function `key` needs; True when that changed anything.
        Ignored for a function that never started here (its env is unknown)."""
        need = self.needs.get(key)
        if need is None:
            return False
        need.seen = now
        imports = list(imports)
        if need.flavour.modules.issuperset(imports):  # every cold start of a known function
            return False
        grown = Flavour(leaves([*need.flavour.imports, *imports]), need.flavour.env)
        if grown.modules == need.flavour.modules:
            return False
        need.flavour = grown
        return True

    def need(self, key: str) -> Flavour | None:
        found = self.needs.get(key)
        return found.flavour if found is not None else None

    def keys(self) -> list[str]:
        return list(self.needs)

    def plan(
        self,
        *,
        gpu: bool,
        now: float,
        refill_s: Callable[[Flavour], float],
        max_flavours: int,
    ) -> list[tuple[Flavour, int]]:
        """The flavours to keep for cold starts on GPUs (or CPU slots) and how many of each,
        the most wanted first."""
        needs = [n for n in self.needs.values() if n.gpu == gpu and n.flavour != BASE]
        # The largest sets first, so a need that another covers joins that one's flavour.
        needs.sort(key=lambda n: (-len(n.flavour.modules), n.flavour.env))
        groups: list[tuple[Flavour, list[_Need]]] = []
        for need in needs:
            flavour = need.flavour
            for chosen, members in groups:
                if chosen.covers(flavour):
                    members.append(need)
                    break
            else:
                groups.append((flavour, [need]))
        groups.sort(key=lambda g: max(n.seen for n in g[1]), reverse=True)
        # Each function of a flavour counts for what its own cold starts call for: functions
        # that share a library may cold-start at the same moment.
        planned = []
        for flavour, members in groups[:max_flavours]:
            refill = refill_s(flavour)
            wanted = sum(depth(list(n.starts), now, refill) for n in members)
            planned.append((flavour, min(MAX_DEPTH, wanted)))
        return planned

    def to_json(self) -> dict[str, Any]:
        """What survives an agent restart: each function's needs (not its history)."""
        return {
            key: {"imports": list(n.flavour.imports), "env": dict(n.flavour.env), "gpu": n.gpu}
            for key, n in self.needs.items()
        }

    def load(self, raw: Mapping[str, Any], *, now: float) -> None:
        for key, entry in list(raw.items())[-self.limit :]:
            try:
                env = {str(k): str(v) for k, v in dict(entry["env"]).items()}
                flavour = Flavour.of(module_names(entry["imports"]), env)
                self.needs[str(key)] = _Need(flavour, bool(entry["gpu"]), seen=now)
            except (KeyError, TypeError, ValueError):
                continue  # a damaged entry is relearned at that function's next cold start

    def _need(self, key: str, env: Mapping[str, str], *, gpu: bool, now: float) -> _Need:
        items = tuple(sorted(env.items()))
        need = self.needs.pop(key, None)  # re-inserted last: the dict is in order of use
        if need is None or need.flavour.env != items or need.gpu != gpu:
            imports = need.flavour.imports if need else ()
            need = _Need(Flavour(imports, items), gpu, seen=now)
        need.seen = now
        self.needs[key] = need
        while len(self.needs) > self.limit:
            del self.needs[next(iter(self.needs))]
        return need


def depth(starts: list[float], now: float, refill_s: float) -> int:
    """How many standbys a flavour keeps, from the times (sorted) of its cold starts: enough for
    the largest burst (starts closer together than a refill takes), and one more than the
    starts the current pace (that of the last few) brings while one standby refills; one when
    cold starts are rare."""
    recent = [t for t in starts if now - t <= RATE_WINDOW_S]
    if not recent:
        return 1
    span = max(1.0, refill_s)
    burst, first = 0, 0
    for last, at in enumerate(recent):
        while at - recent[first] > span:
            first += 1
        burst = max(burst, last - first + 1)
    latest = recent[-_PACE_STARTS:]
    pace = (len(latest) - 1) / max(latest[-1] - latest[0], span)  # starts per second
    # Starts expected while one standby refills; a small chance of one is no reason to keep
    # a second standby.
    during_refill = math.ceil(pace * span - _UNLIKELY)
    return min(MAX_DEPTH, max(burst, during_refill + 1))
