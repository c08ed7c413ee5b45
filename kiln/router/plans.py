"""`/v1/plans`: what customers can be on. Anyone with a key lists them (a customer chooses
among them); operators create and change them. A customer's plan is changed with
`PATCH /v1/customers/ID {"plan": NAME}` (`kiln.billing.plans.change_plan` prorates the fees)."""

from __future__ import annotations

from dataclasses import asdict

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.billing.plans import plan_named
from kiln.db.models import Customer, Plan
from kiln.db.session import transaction
from kiln.errors import Conflict, InvalidRequest
from kiln.gpus import GPU_TYPES
from kiln.router.access import require_operator
from kiln.router.bodies import PlanBody, PlanPatch
from kiln.router.services import RouterServices, services
from kiln.router.validation import read_model
from kiln.router.views import Limits, PlanList, PlanView, dump

__all__ = ["create_plan", "get_plan", "list_plans", "patch_plan"]

_PRICED = (*GPU_TYPES, "none")


def _view(svc: RouterServices, plan: Plan, customers: int) -> PlanView:
    limits = svc.settings.tier_limits[plan.tier.value]
    return PlanView(
        name=plan.name,
        title=plan.title,
        tier=plan.tier,
        monthly_fee_micros=plan.monthly_fee_micros,
        request_price_micros=plan.request_price_micros,
        included_requests=plan.included_requests,
        gpu_prices=dict(plan.gpu_prices),
        limits=Limits(**{**asdict(limits), "burst": limits.burst_size}),
        customers=customers,
    )


def _checked(gpu_prices: dict[str, int]) -> None:
    """Refuse GPU types that do not exist."""
    unknown = sorted(set(gpu_prices) - set(_PRICED))
    if unknown:
        raise InvalidRequest(
            f"gpu_prices names {', '.join(repr(u) for u in unknown)}: the GPU types are "
            f"{', '.join(_PRICED)}",
            param="gpu_prices",
        )


def _customers() -> sa.ScalarSelect[int]:
    return sa.select(sa.func.count()).where(Customer.plan == Plan.name).scalar_subquery()


async def list_plans(request: Request) -> Response:
    svc = services(request)
    await svc.auth.authenticate(request)
    async with svc.sessions() as session:
        rows = (await session.execute(
            sa.select(Plan, _customers()).order_by(Plan.monthly_fee_micros, Plan.name)
        )).all()  # fmt: skip
    return JSONResponse(dump(PlanList(plans=[_view(svc, plan, n) for plan, n in rows])))


async def get_plan(request: Request) -> Response:
    svc = services(request)
    await svc.auth.authenticate(request)
    async with svc.sessions() as session:
        plan = await plan_named(session, request.path_params["name"])
        count = await session.scalar(sa.select(sa.func.count()).where(Customer.plan == plan.name))
    return JSONResponse(dump(_view(svc, plan, count or 0)))


async def create_plan(request: Request) -> Response:
    svc = services(request)
    await require_operator(request, "managing plans needs an operator key")
    body = await read_model(request, PlanBody)
    _checked(body.gpu_prices)
    plan = Plan(
        name=body.name,
        title=body.title,
        tier=body.tier,
        monthly_fee_micros=body.monthly_fee_micros,
        request_price_micros=body.request_price_micros,
        included_requests=body.included_requests,
        gpu_prices=body.gpu_prices,
    )
    try:
        async with transaction(svc.sessions) as session:
            session.add(plan)
    except IntegrityError:
        raise Conflict(
            f"plan {body.name!r} exists already; change it with PATCH /v1/plans/{body.name}",
            param="name",
        ) from None
    return JSONResponse(dump(_view(svc, plan, 0)), status_code=201)


async def patch_plan(request: Request) -> Response:
    svc = services(request)
    await require_operator(request, "managing plans needs an operator key")
    patch = await read_model(request, PlanPatch)
    sent = patch.model_fields_set
    async with transaction(svc.sessions) as session:
        plan = await plan_named(session, request.path_params["name"])
        await session.refresh(plan, with_for_update=True)
        for name in ("title", "tier", "monthly_fee_micros", "request_price_micros",
                     "included_requests", "gpu_prices"):  # fmt: skip
            if name in sent:
                setattr(plan, name, getattr(patch, name))
        _checked(dict(plan.gpu_prices))
        if "tier" in sent:  # the customers' limits follow their plan's tier
            await session.execute(
                sa.update(Customer).where(Customer.plan == plan.name).values(tier=plan.tier)
            )
        await session.flush()
        count = await session.scalar(sa.select(sa.func.count()).where(Customer.plan == plan.name))
        view = _view(svc, plan, count or 0)
    # A new tier's limits reach the routers as their cached verdicts expire (seconds; a minute
    # in Redis), as a change of KILN_TIER_LIMITS does.
    return JSONResponse(dump(view))
