"""Placement: GPU types and counts fit, then cached snapshots, ready standbys and load decide."""

from __future__ import annotations

from kiln.scheduler.placement import NodeView, place
from kiln.wire import affinity_id


def node(
    node_id: str,
    free: dict[str, int],
    *,
    total: dict[str, int] | None = None,
    standbys: dict[str, int] | None = None,
    snapshots: set[str] | None = None,
    ready_for: dict[str, int] | None = None,
) -> NodeView:
    return NodeView(
        node_id,
        total or dict(free),
        dict(free),
        dict(standbys or {}),
        frozenset(snapshots or ()),
        dict(ready_for or {}),
    )


def test_a_replica_goes_only_where_its_gpu_type_and_count_fit() -> None:
    nodes = [node("cpu", {"none": 8}), node("a10", {"A10G": 1}), node("h100", {"H100": 1})]
    assert place("H100:2", nodes) is None  # waits: it is not an error
    placed = place("H100", nodes)
    assert placed is not None
    assert (placed.node_id, placed.kind, placed.count) == ("h100", "H100", 1)
    cpu = place("none", nodes)
    assert cpu is not None
    assert cpu.node_id == "cpu"
    anything = place("any", [node("cpu", {"none": 8}), node("a10", {"A10G": 1, "none": 2})])
    assert anything is not None
    assert (anything.node_id, anything.kind) == ("a10", "A10G")  # "any" GPU, never a CPU slot


def test_a_cached_snapshot_beats_a_standby_which_beats_load() -> None:
    wanted = affinity_id("digest", "Model")
    idle = node("idle", {"H100": 8})
    warm = node("warm", {"H100": 1}, total={"H100": 8}, standbys={"H100": 1})
    cached = node("cached", {"H100": 1}, total={"H100": 8}, snapshots={wanted})
    choice = place("H100", [idle, warm, cached], affinity=wanted)
    assert choice is not None
    assert (choice.node_id, choice.reason) == ("cached", "snapshot")
    choice = place("H100", [idle, warm], affinity=wanted)
    assert choice is not None
    assert (choice.node_id, choice.reason) == ("warm", "standby")
    choice = place("H100", [node("busy", {"H100": 2}, total={"H100": 8}), idle])
    assert choice is not None
    assert (choice.node_id, choice.reason) == ("idle", "least loaded")


def test_a_standby_that_imported_what_the_function_needs_beats_a_generic_one() -> None:
    wanted = affinity_id("digest", "Model")
    generic = node("generic", {"none": 8}, standbys={"none": 2})
    flavoured = node("flavoured", {"none": 2}, total={"none": 8}, standbys={"none": 1},
                     ready_for={wanted: 1})  # fmt: skip
    choice = place("none", [generic, flavoured], affinity=wanted)
    assert choice is not None
    assert (choice.node_id, choice.reason) == ("flavoured", "flavour")
    # A cached snapshot still comes first: a fetch costs more than an import.
    cached = node("cached", {"none": 8}, snapshots={wanted})
    choice = place("none", [generic, flavoured, cached], affinity=wanted)
    assert choice is not None
    assert (choice.node_id, choice.reason) == ("cached", "snapshot")
    # ready_for without a ready standby of the slot kind asked for counts for nothing.
    stale = node("stale", {"none": 8}, ready_for={wanted: 1})
    choice = place("none", [stale, generic], affinity=wanted)
    assert choice is not None
    assert choice.node_id == "generic"


def test_taking_slots_in_the_view_means_no_slot_is_counted_twice() -> None:
    nodes = [node("a", {"H100": 2}), node("b", {"H100": 1})]
    placed = []
    while (choice := place("H100", nodes)) is not None:
        next(n for n in nodes if n.node_id == choice.node_id).take(choice.kind, choice.count)
        placed.append(choice.node_id)
    assert sorted(placed) == ["a", "a", "b"]
    assert all(free >= 0 for n in nodes for free in n.free.values())


def test_equal_nodes_give_the_same_answer_every_time() -> None:
    first = place("none", [node("n2", {"none": 4}), node("n1", {"none": 4})])
    assert first is not None
    assert first.node_id == "n1"


def test_affinity_ids_are_short_and_tell_functions_and_code_apart() -> None:
    ids = {affinity_id(d, f) for d in ("d1", "d2") for f in ("A", "B")}
    assert len(ids) == 4
    assert all(len(i) == 16 for i in ids)


def test_replicas_placed_in_one_pass_count_down_the_fitting_standbys() -> None:
    wanted = affinity_id("digest", "Model")
    one = node("one", {"none": 8}, standbys={"none": 1}, ready_for={wanted: 1})
    two = node("two", {"none": 8}, standbys={"none": 2}, ready_for={wanted: 2})
    nodes = [one, two]
    chosen = []
    for _ in range(4):
        placed = place("none", nodes, affinity=wanted)
        assert placed is not None
        chosen.append((placed.node_id, placed.reason))
        next(n for n in nodes if n.node_id == placed.node_id).take("none", 1, wanted)
    assert chosen == [
        ("one", "flavour"), ("two", "flavour"), ("two", "flavour"), ("one", "least loaded")
    ]  # fmt: skip
