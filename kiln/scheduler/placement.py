"""Where a new replica goes. Pure: the scheduler keeps a view of every node from its heartbeats
and asks `place`; tests and the autoscaling simulation drive it without a cluster.

A replica needs a node with enough free slots of its GPU type: "none" takes CPU slots, "any" a
GPU of any type, "H100:2" two H100s on one node. Among the nodes that fit, the scheduler prefers
one that already caches the function's snapshot (no fetch from the shared store), then one with
a ready standby that imported everything the function needs (no import at all), then one with
any ready standby process for that slot type (no `import torch`), then the least loaded (the
largest share of its slots of that type free), then the node id, so equal views give equal
answers. `take` updates the view at once, so two replicas placed in one pass never count the
same free slot; the node agent's own slot table is the final word and refuses what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.functions.gpu import gpu_request

__all__ = ["NodeView", "Placement", "place"]


@dataclass
class NodeView:
    node_id: str
    total: dict[str, int]  # slots by kind ("none" = CPU, else a GPU type)
    free: dict[str, int]
    standbys: dict[str, int] = field(default_factory=dict)  # ready standbys by slot kind
    snapshots: frozenset[str] = frozenset()  # kiln.wire.affinity_id of the snapshots it caches
    # affinity id -> ready standbys there that imported everything that function needs
    ready_for: dict[str, int] = field(default_factory=dict)
    containers: bool = False  # it runs container pods
    gpu_containers: bool = False  # with GPUs

    def take(self, kind: str, count: int, affinity: str | None = None) -> None:
        self.free[kind] = self.free.get(kind, 0) - count
        if self.standbys.get(kind):
            self.standbys[kind] -= 1
        if affinity is not None and self.ready_for.get(affinity):
            self.ready_for[affinity] -= 1


@dataclass(frozen=True)
class Placement:
    node_id: str
    kind: str  # the slot kind it takes there
    count: int
    reason: str  # "snapshot", "flavour", "standby" or "least loaded": for logs and metrics


def place(gpu: str, nodes: list[NodeView], affinity: str | None = None) -> Placement | None:
    """The best node for a replica asking for `gpu`, or None when nothing fits now."""
    kind, count = gpu_request(gpu)
    options: list[tuple[tuple[bool, bool, bool, float, str], NodeView, str]] = []
    for node in nodes:
        kinds = [k for k in node.free if k != "none"] if kind == "any" else [kind]
        for candidate in kinds:
            if node.free.get(candidate, 0) < count:
                continue
            cached = affinity is not None and affinity in node.snapshots
            standby = node.standbys.get(candidate, 0) > 0
            flavour = standby and affinity is not None and node.ready_for.get(affinity, 0) > 0
            load = 1 - node.free[candidate] / max(1, node.total.get(candidate, 0))
            rank = (not cached, not flavour, not standby, load, node.node_id)
            options.append((rank, node, candidate))
    if not options:
        return None
    (no_cache, no_flavour, no_standby, _, _), node, chosen = min(options, key=lambda o: o[0])
    reason = (
        "snapshot" if not no_cache
        else "flavour" if not no_flavour
        else "standby" if not no_standby
        else "least loaded"
    )  # fmt: skip
    return Placement(node.node_id, chosen, count, reason)
