"""Autoscaling simulation: the scheduler's own decisions, `kiln.scheduler.policy.plan` and
`kiln.scheduler.placement.place`, driven by a fake clock through request traces on a simulated
cluster, so policies can be compared for thousands of calls and hundreds of functions without a
cluster. One table per trace; one row per policy, and two baselines: every function always at
`max_replicas`, and scale to zero as soon as a replica is idle (min 0, no buffer, 10 s).

    .venv/bin/python bench/autoscale_sim.py [--minutes 60] [--cold-start 1.0] [--seed 1]

What is simulated: calls arrive (Poisson, with the trace's rate over time) into each function's
queue; a ready replica with a free slot takes the oldest one at once and holds it for the
function's service time; the scheduler reconciles every function once a second (as the real one
does), and at once when a call arrives for a function with no replica (the router's wake hint);
a replica it starts is placed on a node with a free slot and serves `--cold-start` seconds later
(a snapshot restore into a standby); an idle replica it drains stops at once. Columns: replicas
started (cold starts), the wait for capacity (arrival until a replica takes the call) at p50
and p99, and replica-hours, which is what the customer pays for.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.scheduler.placement import NodeView, place
from kiln.scheduler.policy import ReplicaView, Scaling, plan

TICK_S = 1.0
NODES, SLOTS_PER_NODE, GPU = 64, 8, "A10G"


@dataclass
class Function:
    name: str
    service_s: float
    scaling: Scaling
    concurrency: int = 1
    queue: deque[float] = field(default_factory=deque)
    live: list[Replica] = field(default_factory=list)  # started and not stopped


@dataclass
class Replica:
    id: str
    function: Function
    node: str
    started_at: float
    ready_at: float
    in_flight: int = 0
    idle_since: float | None = None
    stopped_at: float | None = None


@dataclass
class Outcome:
    cold_starts: int = 0
    waits: list[float] = field(default_factory=list)
    replica_seconds: float = 0.0
    placement_failures: int = 0


class Simulation:
    def __init__(self, functions: list[Function], cold_start_s: float, end_s: float) -> None:
        self.functions = functions
        self.cold_start_s = cold_start_s
        self.end_s = end_s
        self.nodes = {
            f"n{i}": NodeView(f"n{i}", {GPU: SLOTS_PER_NODE}, {GPU: SLOTS_PER_NODE})
            for i in range(NODES)
        }
        self.replicas: list[Replica] = []  # every replica ever started, for the bill
        self.events: list[tuple[float, int, str, object]] = []
        self.sequence = itertools.count()
        self.ids = itertools.count()
        self.out = Outcome()

    def at(self, when: float, kind: str, subject: object) -> None:
        heapq.heappush(self.events, (when, next(self.sequence), kind, subject))

    def run(self, arrivals: dict[str, list[float]]) -> Outcome:
        by_name = {f.name: f for f in self.functions}
        for name, times in arrivals.items():
            for t in times:
                self.at(t, "arrive", by_name[name])
        for function in self.functions:  # minimums exist before the first call
            self.reconcile(function, 0.0)
        tick = 0.0
        while tick <= self.end_s:
            self.at(tick, "tick", None)
            tick += TICK_S
        while self.events:
            now, _, kind, subject = heapq.heappop(self.events)
            if kind == "arrive":
                assert isinstance(subject, Function)
                subject.queue.append(now)
                if not subject.live:
                    self.reconcile(subject, now)  # the router's wake hint
                self.dispatch(subject, now)
            elif kind == "done":
                assert isinstance(subject, Replica)
                subject.in_flight -= 1
                if subject.in_flight == 0:
                    subject.idle_since = now
                self.dispatch(subject.function, now)
            elif kind == "ready":
                assert isinstance(subject, Replica)
                subject.idle_since = now
                self.dispatch(subject.function, now)
            elif kind == "tick":
                for function in self.functions:
                    self.reconcile(function, now)
        for replica in self.replicas:
            stopped = replica.stopped_at if replica.stopped_at is not None else self.end_s
            self.out.replica_seconds += max(0.0, stopped - replica.started_at)
        return self.out

    def dispatch(self, function: Function, now: float) -> None:
        for replica in function.live:
            if replica.ready_at > now:
                continue
            while function.queue and replica.in_flight < function.concurrency:
                self.out.waits.append(now - function.queue.popleft())
                replica.in_flight += 1
                replica.idle_since = None
                self.at(now + function.service_s, "done", replica)

    def reconcile(self, function: Function, now: float) -> None:
        if not function.live and not function.queue and not function.scaling.min_replicas:
            return  # at zero with nothing waiting: the plan would be "nothing" (saves time)
        views = [
            ReplicaView(r.id, r.in_flight, r.idle_since, ready=r.ready_at <= now)
            for r in function.live
        ]
        decision = plan(function.scaling, views, pending=len(function.queue), now=now)
        for _ in range(decision.start):
            spot = place(GPU, list(self.nodes.values()))
            if spot is None:
                self.out.placement_failures += 1
                break
            self.nodes[spot.node_id].take(spot.kind, 1)
            replica = Replica(
                f"r{next(self.ids)}", function, spot.node_id, now, now + self.cold_start_s
            )
            self.replicas.append(replica)
            function.live.append(replica)
            self.out.cold_starts += 1
            self.at(replica.ready_at, "ready", replica)
        draining = set(decision.drain)
        for replica in [r for r in function.live if r.id in draining]:
            replica.stopped_at = now  # idle: a drain finishes at once
            function.live.remove(replica)
            self.nodes[replica.node].free[GPU] += 1


# Traces -----------------------------------------------------------------------------------------


def poisson(
    rate: Callable[[float], float], peak: float, end_s: float, rng: random.Random
) -> list[float]:
    """Arrival times of a Poisson process whose rate changes over time (thinning)."""
    times, t = [], 0.0
    while peak > 0:
        t += rng.expovariate(peak)
        if t >= end_s:
            break
        if rng.random() < rate(t) / peak:
            times.append(t)
    return times


def traces(
    end_s: float,
) -> dict[str, list[tuple[str, Callable[[float], float], float, float, int]]]:
    """Trace name -> functions as (name, rate(t), peak rate, service seconds, max replicas)."""
    day = end_s  # a whole day squeezed into the run

    def diurnal(t: float) -> float:
        return 0.2 + 2.8 * (1 - math.cos(2 * math.pi * t / day)) / 2

    def bursty(t: float) -> float:
        return 15.0 if t % 600 < 20 else 0.02

    return {
        "steady (2 calls/s, 0.4 s each)": [("steady", lambda t: 2.0, 2.0, 0.4, 8)],
        "diurnal (0.2 to 3 calls/s over the run, 0.4 s each)": [("diurnal", diurnal, 3.0, 0.4, 8)],
        "bursty (20 s at 15 calls/s every 10 min, else 0.02/s; 0.5 s each)": [
            ("bursty", bursty, 15.0, 0.5, 10)
        ],
        "many mostly idle (200 functions, one call per 15 min each, 1 s)": [
            (f"idle{i}", lambda t: 1 / 900, 1 / 900, 1.0, 2) for i in range(200)
        ],
    }


# Policies ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    name: str
    scaling: Callable[[int], Scaling]  # max_replicas -> settings


POLICIES = [
    Policy(f"idle {idle}s, buffer {buffer}", lambda top, i=idle, b=buffer: Scaling(0, top, b, 1, i))
    for idle in (30, 120, 300)
    for buffer in (0, 1)
] + [
    Policy("baseline: always max", lambda top: Scaling(top, top, 0, 1, 300)),
    Policy("baseline: min 0, no buffer, 10 s", lambda top: Scaling(0, top, 0, 1, 10)),
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--cold-start", type=float, default=1.0, help="seconds to ready")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.minutes <= 0 or args.cold_start < 0:
        parser.error("--minutes must be positive and --cold-start not negative")
    end_s = args.minutes * 60
    print(f"{args.minutes:g} simulated minutes; {NODES} nodes x {SLOTS_PER_NODE} {GPU}; "
          f"replicas serve {args.cold_start:g} s after they are started; reconcile every "
          f"{TICK_S:g} s")  # fmt: skip
    for trace, specs in traces(end_s).items():
        rng = random.Random(args.seed)
        arrivals = {name: poisson(rate, peak, end_s, rng) for name, rate, peak, _, _ in specs}
        calls = sum(len(times) for times in arrivals.values())
        print(f"\n{trace}: {calls} calls")
        print(f"  {'policy':<34} {'cold starts':>11} {'wait p50 ms':>12} {'wait p99 ms':>12} "
              f"{'replica-h':>10} {'unplaced':>8}")  # fmt: skip
        for policy in POLICIES:
            functions = [
                Function(name, service, policy.scaling(top)) for name, _, _, service, top in specs
            ]
            out = Simulation(functions, args.cold_start, end_s).run(arrivals)
            print(f"  {policy.name:<34} {out.cold_starts:>11} "
                  f"{percentile(out.waits, 0.5) * 1000:>12.0f} "
                  f"{percentile(out.waits, 0.99) * 1000:>12.0f} "
                  f"{out.replica_seconds / 3600:>10.2f} {out.placement_failures:>8}")  # fmt: skip


if __name__ == "__main__":
    main()
