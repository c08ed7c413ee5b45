"""The tier caps on pods (`TierLimits.max_pods` and `max_pod_gpus`), checked when a pod is made
or started: in the transaction that makes or starts it, with its customer's row locked first,
so two requests at once cannot both take the last pod (the second waits for the first to
commit, then counts it).

Active pods are those starting or running, shells included: each holds a slot. Operators
have no limits; a customer's are its tier's with its `limit_overrides`, read from its row (not
from the key's cached verdict, which may be a minute old).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.db.enums import ACTIVE_POD_STATES
from kiln.db.models import Customer, Function, Pod
from kiln.errors import RateLimited
from kiln.functions.gpu import gpu_request
from kiln.router.auth import Principal
from kiln.tiers import TierLimits, with_overrides

__all__ = ["check_pod_room", "gpus_of", "locked_limits", "pod_limit_refusal"]

_log = logging.getLogger(__name__)


async def locked_limits(
    session: AsyncSession, tiers: Mapping[str, TierLimits], principal: Principal
) -> TierLimits | None:
    """The caller's limits, its customer's row locked until the transaction ends; None for an
    operator (no limits)."""
    if principal.customer_id is None:
        return None
    # FOR NO KEY UPDATE: it serialises pod checks without holding up rows that merely refer
    # to the customer (an insert's foreign key check takes KEY SHARE).
    row = (
        await session.execute(
            sa.select(Customer.tier, Customer.limit_overrides)
            .where(Customer.id == principal.customer_id)
            .with_for_update(key_share=True)
        )
    ).one()
    tier, overrides = row
    try:
        return with_overrides(tiers[tier.value], overrides)
    except ValueError:  # stored overrides that no longer parse: the tier's own
        _log.warning("ignoring the limit overrides of customer %s", principal.customer_id)
        return tiers[tier.value]


async def check_pod_room(
    session: AsyncSession,
    limits: TierLimits | None,
    *,
    customer_id: uuid.UUID,
    function_id: uuid.UUID,
    gpu: str | None,
) -> None:
    """429 when one more active pod of `function_id` on `gpu` (None: the function's) would
    pass `limits`. Call it after `locked_limits`, in the same transaction."""
    if limits is None:
        return
    held = [
        gpus_of(own or default)
        for own, default in await session.execute(
            sa.select(Pod.gpu, Function.gpu)
            .join(Function, Function.id == Pod.function_id)
            .where(Pod.customer_id == customer_id, Pod.state.in_(ACTIVE_POD_STATES))
        )
    ]
    if gpu is None:
        gpu = await session.scalar(sa.select(Function.gpu).where(Function.id == function_id))
    refusal = pod_limit_refusal(limits, held=held, gpu=gpu or "none")
    if refusal is not None:
        raise RateLimited(refusal)


def gpus_of(gpu: str) -> int:
    """GPUs a request holds: 'none' none, 'any' one, 'H100:2' two."""
    kind, count = gpu_request(gpu)
    return 0 if kind == "none" else count


def pod_limit_refusal(limits: TierLimits, *, held: list[int], gpu: str) -> str | None:
    """Why one more pod on `gpu` does not fit `limits`, with active pods holding `held` GPUs
    each; None when it fits."""
    if len(held) + 1 > limits.max_pods:
        pods = "pod" if limits.max_pods == 1 else "pods"
        return (
            f"pod limit reached: this account may have {limits.max_pods} active {pods} "
            f"(starting or running; shells count) and has {len(held)}; stop or delete one "
            "(`kiln pods ls` lists them), or ask an operator to raise its max_pods"
        )
    asking = gpus_of(gpu)
    if asking and sum(held) + asking > limits.max_pod_gpus:
        gpus = "GPU" if limits.max_pod_gpus == 1 else "GPUs"
        return (
            f"pod GPU limit reached: this account's active pods may hold {limits.max_pod_gpus} "
            f"{gpus} at once; they hold {sum(held)} and this one asks for {asking} "
            f"(gpu={gpu!r}); stop one, ask for fewer GPUs, or ask an operator to raise its "
            "max_pod_gpus"
        )
    return None
