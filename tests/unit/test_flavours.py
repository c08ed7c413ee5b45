"""Standby flavours: what a node's standbys import and how many of each it keeps, planned from
what its functions needed and when their cold starts happened (a fake clock)."""

from __future__ import annotations

import pytest

from kiln.invoker.flavours import BASE, MAX_DEPTH, RATE_WINDOW_S, Demand, Flavour, depth

GPT2 = ["torch.nn.modules.linear", "transformers.models.gpt2.modeling_gpt2"]
LLAMA = ["torch.nn.modules.linear", "transformers.models.llama.modeling_llama"]


def refill(_: Flavour) -> float:
    return 3.0


def test_a_flavour_covers_what_it_imported_and_the_packages_above() -> None:
    flavour = Flavour.of(GPT2)
    assert flavour.covers(Flavour.of(["transformers", "torch.nn"]))
    assert flavour.covers(Flavour.of(GPT2))
    assert not flavour.covers(Flavour.of(LLAMA))
    assert not flavour.covers(Flavour.of(GPT2, {"HF_HUB_OFFLINE": "1"}))  # another env
    assert BASE.covers(BASE)
    assert Flavour.of(["a.b", "a"]).imports == ("a.b",)  # kept as leaves
    assert Flavour.of(GPT2).id == Flavour.of(reversed(GPT2)).id


def test_functions_whose_needs_another_covers_share_its_flavour() -> None:
    demand = Demand()
    demand.started("small", {}, gpu=False, now=0)
    demand.learn("small", ["transformers.models.gpt2"], now=0)
    demand.started("large", {}, gpu=False, now=1)
    demand.learn("large", GPT2, now=1)
    demand.started("other", {}, gpu=False, now=2)
    demand.learn("other", LLAMA, now=2)
    plan = demand.plan(gpu=False, now=2, refill_s=refill, max_flavours=8)
    # One standby for each function: the two GPT-2 functions may cold-start at once.
    assert plan == [(Flavour.of(LLAMA), 1), (Flavour.of(GPT2), 2)]


def test_the_env_a_function_runs_under_is_part_of_its_flavour() -> None:
    demand = Demand()
    demand.started("a", {"MODE": "x"}, gpu=False, now=0)
    demand.learn("a", GPT2, now=0)
    demand.started("b", {}, gpu=False, now=0)
    demand.learn("b", GPT2, now=0)
    envs = {flavour.env for flavour, _ in demand.plan(gpu=False, now=0, refill_s=refill,
                                                        max_flavours=8)}  # fmt: skip
    assert envs == {(("MODE", "x"),), ()}


def test_gpu_and_cpu_functions_are_planned_apart_and_unknown_needs_get_no_flavour() -> None:
    demand = Demand()
    demand.started("gpu", {}, gpu=True, now=0)
    demand.learn("gpu", GPT2, now=0)
    demand.started("nothing-learned", {}, gpu=False, now=0)
    assert demand.plan(gpu=False, now=0, refill_s=refill, max_flavours=8) == []
    assert [f for f, _ in demand.plan(gpu=True, now=0, refill_s=refill, max_flavours=8)] == [
        Flavour.of(GPT2)
    ]
    assert not demand.learn("never-started", GPT2, now=0)  # its env is unknown: not kept


def test_the_most_recently_used_flavours_are_kept_when_there_are_too_many() -> None:
    demand = Demand()
    for number in range(5):
        demand.started(f"f{number}", {}, gpu=False, now=number)
        demand.learn(f"f{number}", [f"library{number}"], now=number)
    plan = demand.plan(gpu=False, now=10, refill_s=refill, max_flavours=2)
    assert [flavour.imports for flavour, _ in plan] == [("library4",), ("library3",)]


def test_learning_grows_a_need_and_says_when_it_changed() -> None:
    demand = Demand()
    demand.started("f", {}, gpu=False, now=0)
    assert demand.learn("f", ["sympy.core"], now=0)
    assert not demand.learn("f", ["sympy"], now=0)  # imported already with sympy.core
    assert demand.learn("f", ["mpmath"], now=0)
    assert demand.need("f") == Flavour.of(["sympy.core", "mpmath"])


def test_depth_covers_bursts_and_the_rate_during_a_refill() -> None:
    assert depth([], now=1000, refill_s=3) == 1  # remembered, nothing recent: one ready
    assert depth([0.0], now=RATE_WINDOW_S + 1, refill_s=3) == 1  # too long ago
    assert depth([990.0], now=1000, refill_s=3) == 1  # no pace yet
    assert depth([900.0, 990.0], now=1000, refill_s=3) == 1  # rare: one refills in time
    assert depth([990.0, 990.1, 990.2], now=1000, refill_s=3) == 3  # a burst of three
    # One every 4.5 s against refills of 6 s: another comes while one refills.
    assert depth([990.0, 994.5, 999.0], now=1000, refill_s=6) == 3
    assert depth([990.0, 995.0, 999.0], now=1000, refill_s=3) == 2
    steady = [1000.0 - 2 * i for i in range(60)]  # one every 2 s, refills take 30 s
    assert depth(sorted(steady), now=1000, refill_s=30) == MAX_DEPTH
    # One every 2 s, refills of 3 s: 1.5 starts come while one refills.
    assert depth(sorted(steady), now=1000, refill_s=3) == 3
    # The pace is the last few starts': a burst long past is forgotten.
    assert depth([0.0, 1.0, 2.0, 3.0, 900.0], now=1000, refill_s=3) == 1


def test_a_burst_deepens_the_flavour_of_the_function_it_came_from() -> None:
    demand = Demand()
    for replica in range(3):
        demand.started("f", {}, gpu=False, now=100 + replica * 0.01)
    demand.learn("f", GPT2, now=100)
    [(_, count)] = demand.plan(gpu=False, now=101, refill_s=refill, max_flavours=8)
    assert count == 3


def test_needs_survive_a_restart_without_their_history() -> None:
    demand = Demand()
    demand.started("f", {"MODE": "x"}, gpu=True, now=0)
    demand.learn("f", GPT2, now=0)
    again = Demand()
    again.load(demand.to_json(), now=50)
    assert again.need("f") == demand.need("f")
    assert again.plan(gpu=True, now=50, refill_s=refill, max_flavours=8) == [
        (Flavour.of(GPT2, {"MODE": "x"}), 1)
    ]
    broken = Demand()
    broken.load({"f": {"imports": ["bad name"], "env": {}, "gpu": False}, "g": "junk"}, now=0)
    assert broken.keys() == []


@pytest.mark.parametrize("limit", [1, 3])
def test_a_node_remembers_a_bounded_number_of_functions(limit: int) -> None:
    demand = Demand(limit=limit)
    for number in range(5):
        demand.started(f"f{number}", {}, gpu=False, now=number)
    assert demand.keys() == [f"f{number}" for number in range(5 - limit, 5)]
