"""Tier limits and their overrides, and the local limiter Redis's absence falls back to."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kiln.router.limits import _LocalLimiter
from kiln.router.pod_limits import pod_limit_refusal
from kiln.tiers import DEFAULT_TIERS, TierLimits, parse_tier_limits, with_overrides

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def test_the_defaults_follow_the_issue() -> None:
    free, pro, enterprise = (DEFAULT_TIERS[t] for t in ("free", "pro", "enterprise"))
    assert (free.per_minute, free.per_day, free.per_month, free.concurrent, free.max_replicas) == (
        10, 1_000, 10_000, 2, 1
    )  # fmt: skip
    assert (pro.per_minute, pro.per_day, pro.per_month, pro.concurrent, pro.max_replicas) == (
        100, 10_000, 100_000, 20, 10
    )  # fmt: skip
    assert (enterprise.per_month, enterprise.concurrent, enterprise.max_replicas) == (
        None, 200, 100
    )  # fmt: skip
    assert free.burst_size == 10  # a minute's worth at once, unless told otherwise


def test_settings_and_customers_change_limits_and_nonsense_is_refused() -> None:
    tiers = parse_tier_limits('{"free": {"per_minute": 20, "burst": 5}}')
    assert (tiers["free"].per_minute, tiers["free"].burst_size) == (20, 5)
    assert tiers["pro"] == DEFAULT_TIERS["pro"]
    assert with_overrides(DEFAULT_TIERS["pro"], {"per_month": None}).per_month is None
    for bad, message in [
        ({"per_minute": 0}, "per_minute=0 is not valid: expected an integer >= 1"),
        ({"concurrent": None}, "concurrent=None is not valid: expected an integer >= 1"),
        ({"per_day": "lots"}, "per_day='lots' is not valid: expected an integer >= 1 or null"),
        ({"speed": 1}, "limits take per_minute, per_day"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            with_overrides(DEFAULT_TIERS["free"], bad)
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        parse_tier_limits('{"gold": {}}')


def test_the_local_limiter_splits_the_limits_between_the_routers() -> None:
    limits = TierLimits(per_minute=60, per_day=None, per_month=None, concurrent=4,
                        max_replicas=1, burst=6)  # fmt: skip
    alone, shared = _LocalLimiter(), _LocalLimiter()
    let_in = [alone.check("c", limits, 1, None, 0, NOW) is None for _ in range(10)]
    assert let_in.count(True) == 6  # the burst, then one a second
    let_in = [shared.check("c", limits, 3, None, 0, NOW) is None for _ in range(10)]
    assert let_in.count(True) == 2  # a third of the burst on each of three routers
    slots = _LocalLimiter()
    assert slots.check("c", limits, 2, "a", 60, NOW) is None
    assert slots.check("c", limits, 2, "b", 60, NOW) is None
    refused = slots.check("c", limits, 2, "x", 60, NOW)
    assert refused is not None
    assert refused[0] == "concurrent"
    slots.release("c", "a")
    assert slots.check("c", limits, 2, "c", 60, NOW) is None


def test_prepaid_tiers_and_overrides() -> None:
    assert DEFAULT_TIERS["free"].prepaid
    assert DEFAULT_TIERS["pro"].prepaid
    assert not DEFAULT_TIERS["enterprise"].prepaid  # invoiced afterwards
    assert not with_overrides(DEFAULT_TIERS["pro"], {"prepaid": False}).prepaid
    with pytest.raises(ValueError, match=r"prepaid=1 is not valid: expected true or false"):
        with_overrides(DEFAULT_TIERS["pro"], {"prepaid": 1})


def test_pod_caps_per_tier_and_their_overrides() -> None:
    free, pro, enterprise = (DEFAULT_TIERS[t] for t in ("free", "pro", "enterprise"))
    assert [(t.max_pods, t.max_pod_gpus) for t in (free, pro, enterprise)] == [
        (1, 1), (10, 8), (100, 64)
    ]  # fmt: skip
    assert free.describe().endswith(", 1 replica, 1 pod with 1 GPU, prepaid")
    kept_out = with_overrides(pro, {"max_pods": 0, "max_pod_gpus": 0})  # none at all
    assert (kept_out.max_pods, kept_out.max_pod_gpus) == (0, 0)
    with pytest.raises(
        ValueError, match=r"^max_pod_gpus=-1 is not valid: expected an integer >= 0$"
    ):
        with_overrides(pro, {"max_pod_gpus": -1})
    assert parse_tier_limits('{"free": {"max_pods": 3}}')["free"].max_pods == 3


def test_a_pod_past_the_caps_is_refused_naming_the_limit_the_count_and_the_way_out() -> None:
    free = DEFAULT_TIERS["free"]
    assert pod_limit_refusal(free, held=[], gpu="H100") is None
    assert pod_limit_refusal(free, held=[0], gpu="none") == (
        "pod limit reached: this account may have 1 active pod (starting or running; shells "
        "count) and has 1; stop or delete one (`kiln pods ls` lists them), or ask an operator "
        "to raise its max_pods"
    )
    assert pod_limit_refusal(free, held=[], gpu="H100:2") == (
        "pod GPU limit reached: this account's active pods may hold 1 GPU at once; they hold 0 "
        "and this one asks for 2 (gpu='H100:2'); stop one, ask for fewer GPUs, or ask an "
        "operator to raise its max_pod_gpus"
    )
    pro = DEFAULT_TIERS["pro"]
    assert pod_limit_refusal(pro, held=[4, 0, 2, 1], gpu="any") is None  # 8 of 8
    assert pod_limit_refusal(pro, held=[4, 0, 2, 2], gpu="none") is None  # CPU pods hold none
    refused = pod_limit_refusal(pro, held=[4, 0, 2, 2], gpu="A10G")
    assert refused is not None
    assert refused.startswith("pod GPU limit reached: this account's active pods may hold 8 "
                              "GPUs at once; they hold 8 and this one asks for 1")  # fmt: skip
