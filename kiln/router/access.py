"""Customers and API keys: `/v1/customers` (operator keys only) and `/v1/keys`.

Operators manage every customer and key. An account key manages its own customer's keys (it
may create account and function-scoped keys, never operator keys). A function-scoped key
manages nothing. Another customer's keys answer 404. A new key's secret is in the answer to
the request that made it, once; the database keeps only its HMAC and a short prefix.
Revoking a key (or disabling a customer) is pushed to every router over NATS, so no router
accepts it two seconds later.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.apikeys import mint_key
from kiln.billing.ledger import Changes, billing_rules, refresh_block
from kiln.billing.plans import change_plan, charge_period_fee, period_of, plan_named
from kiln.db.enums import ApiKeyKind
from kiln.db.models import ApiKey, App, Customer, Function
from kiln.db.session import transaction
from kiln.errors import InvalidRequest, NotFound, PermissionDenied
from kiln.router.auth import Principal
from kiln.router.billing import announce
from kiln.router.bodies import CustomerBody, CustomerPatch, KeyBody, KeysQuery
from kiln.router.services import RouterServices, services
from kiln.router.validation import read_model, read_query
from kiln.router.views import (
    CustomerList,
    CustomerView,
    Key,
    KeyList,
    Limits,
    NewKey,
    RotatedKey,
    dump,
)
from kiln.tiers import TierLimits, with_overrides

__all__ = [
    "CustomerMaker",
    "create_customer",
    "create_key",
    "get_customer",
    "list_customers",
    "list_keys",
    "patch_customer",
    "require_operator",
    "revoke_key",
    "rotate_key",
]


async def require_operator(
    request: Request, refusal: str = "managing customers needs an operator key"
) -> Principal:
    """The caller's principal, which must be an operator's; 403 with `refusal` otherwise."""
    principal = await services(request).auth.authenticate(request)
    if principal.kind is not ApiKeyKind.OPERATOR:
        raise PermissionDenied(refusal)
    return principal


def _customer_id(raw: object) -> uuid.UUID:
    try:
        return uuid.UUID(str(raw))
    except ValueError:
        raise NotFound(f"customer {raw!r} not found") from None


def _customer_view(customer: Customer, tiers: Mapping[str, TierLimits], keys: int) -> CustomerView:
    try:
        limits = with_overrides(tiers[customer.tier.value], customer.limit_overrides)
    except ValueError:
        limits = tiers[customer.tier.value]
    return CustomerView(
        id=str(customer.id),
        name=customer.name,
        plan=customer.plan,
        tier=customer.tier,
        status=customer.status,
        created_at=customer.created_at.isoformat(),
        limits=Limits(**{**asdict(limits), "burst": limits.burst_size}),
        limit_overrides=customer.limit_overrides or {},
        active_keys=keys,
    )


# Customers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomerMaker:
    """Makes customers: `POST /v1/customers` and the console's registration."""

    svc: RouterServices

    async def add(self, session: AsyncSession, name: str, plan: str, changes: Changes) -> uuid.UUID:
        """A customer on `plan` (its tier is the plan's), whose fee for the rest of this period
        is charged now: a prepaid customer pays it before calling."""
        now = datetime.now(UTC)
        chosen = await plan_named(session, plan)
        customer = Customer(name=name, tier=chosen.tier, plan=chosen.name, plan_since=now)
        session.add(customer)
        await session.flush()
        rules = billing_rules(self.svc.settings)
        await charge_period_fee(session, customer, period_of(now), rules, changes)
        await _billing_check(self.svc, session, customer.id, changes)
        return customer.id

    async def announce(self, changes: Changes) -> None:
        await announce(self.svc, changes)


async def create_customer(request: Request) -> Response:
    svc = services(request)
    await require_operator(request)
    body = await read_model(request, CustomerBody)
    if {"plan", "tier"} <= body.model_fields_set:
        raise InvalidRequest("send plan or tier, not both: a plan says its tier", param="plan")
    maker = CustomerMaker(svc)
    async with transaction(svc.sessions) as session:
        # A tier alone names its default plan (the plans named after the tiers).
        plan = body.plan if "plan" in body.model_fields_set else body.tier.value
        customer_id = await maker.add(session, body.name, plan, changes := Changes())
        customer = await session.get_one(Customer, customer_id, populate_existing=True)
        view = _customer_view(customer, svc.settings.tier_limits, 0)
    await maker.announce(changes)
    return JSONResponse(dump(view), status_code=201)


async def list_customers(request: Request) -> Response:
    svc = services(request)
    await require_operator(request)
    async with transaction(svc.sessions) as session:
        rows = await session.execute(
            sa.select(Customer, _active_keys()).order_by(Customer.created_at)
        )
        views = [
            _customer_view(customer, svc.settings.tier_limits, keys) for customer, keys in rows
        ]
    return JSONResponse(dump(CustomerList(customers=views)))


async def get_customer(request: Request) -> Response:
    svc = services(request)
    await require_operator(request)
    customer_id = _customer_id(request.path_params["customer_id"])
    async with transaction(svc.sessions) as session:
        row = (
            await session.execute(
                sa.select(Customer, _active_keys()).where(Customer.id == customer_id)
            )
        ).first()
        if row is None:
            raise NotFound(f"customer {customer_id} not found")
        view = _customer_view(row[0], svc.settings.tier_limits, row[1])
    return JSONResponse(dump(view))


async def patch_customer(request: Request) -> Response:
    """Change a customer's tier, or disable (enable) it: `{"tier": "pro"}`,
    `{"status": "disabled"}`."""
    svc = services(request)
    await require_operator(request)
    customer_id = _customer_id(request.path_params["customer_id"])
    patch = await read_model(request, CustomerPatch)
    sent = patch.model_fields_set
    if {"plan", "tier"} <= sent:
        raise InvalidRequest("send plan or tier, not both: a plan says its tier", param="plan")
    changes = Changes()
    async with transaction(svc.sessions) as session:
        customer = await session.get(Customer, customer_id, with_for_update=True)
        if customer is None:
            raise NotFound(f"customer {customer_id} not found")
        if sent & {"plan", "tier"}:
            # A tier alone names its default plan; either way the fees are prorated from now.
            plan = patch.plan if "plan" in sent else patch.tier.value
            rules = billing_rules(svc.settings)
            await change_plan(session, customer_id, plan, datetime.now(UTC), rules, changes)
        if "limits" in sent:
            # Checked against the tier now, so a bad override never reaches the routers.
            try:
                with_overrides(svc.settings.tier_limits[customer.tier.value], patch.limits)
            except ValueError as exc:
                raise InvalidRequest(f"limits are not valid: {exc}") from None
            customer.limit_overrides = patch.limits or None
        if "name" in sent:
            customer.name = patch.name
        if "status" in sent:
            customer.status = patch.status
        await session.flush()
        await _billing_check(svc, session, customer_id, changes)
        await session.refresh(customer)
        keys = await session.scalar(sa.select(_active_keys()).where(Customer.id == customer_id))
        view = _customer_view(customer, svc.settings.tier_limits, keys or 0)
        digests = list(
            await session.scalars(
                sa.select(ApiKey.key_hash).where(ApiKey.customer_id == customer_id)
            )
        )
    # Whatever changed, the verdicts cached before say otherwise (status, tier, limits).
    await svc.auth.forget(customer_id=customer_id, digests=digests)
    await announce(svc, changes)
    return JSONResponse(dump(view))


async def _billing_check(
    svc: RouterServices, session: AsyncSession, customer_id: uuid.UUID, changes: Changes
) -> None:
    """A prepaid tier with nothing paid in may not call yet; a tier without prepayment may."""
    await refresh_block(session, customer_id, billing_rules(svc.settings), changes)


def _active_keys() -> sa.ScalarSelect[int]:
    return (
        sa.select(sa.func.count())
        .where(ApiKey.customer_id == Customer.id, ApiKey.revoked_at.is_(None))
        .scalar_subquery()
    )


# Keys ------------------------------------------------------------------------------------------


async def create_key(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.authenticate(request)
    body = await read_model(request, KeyBody)
    expires_at = _expiry(body.expires_in_s)
    async with transaction(svc.sessions) as session:
        customer_id, function_id, target = await _scope(session, principal, body)
        minted = mint_key(body.kind)
        key = ApiKey(
            kind=body.kind,
            customer_id=customer_id,
            function_id=function_id,
            key_hash=minted.digest(svc.auth.pepper),
            prefix=minted.prefix,
            name=body.name,
            expires_at=expires_at,
        )
        session.add(key)
        await session.flush()
        await session.refresh(key)
        view = NewKey(**_key_fields(key, target), key=minted.plaintext)
    return JSONResponse(dump(view), status_code=201)


async def list_keys(request: Request) -> Response:
    svc = services(request)
    principal = await _key_manager(request, svc)
    query = (
        sa.select(ApiKey, App.name, Function.name)
        .outerjoin(Function, Function.id == ApiKey.function_id)
        .outerjoin(App, App.id == Function.app_id)
        .order_by(ApiKey.created_at)
    )
    asked = read_query(request, KeysQuery).customer_id
    if principal.kind is not ApiKeyKind.OPERATOR:
        query = query.where(ApiKey.customer_id == principal.customer_id)
    elif asked is not None:
        query = query.where(ApiKey.customer_id == asked)
    async with transaction(svc.sessions) as session:
        views = [
            Key(**_key_fields(key, f"{app}/{function}" if function else None))
            for key, app, function in await session.execute(query)
        ]
    return JSONResponse(dump(KeyList(keys=views)))


async def revoke_key(request: Request) -> Response:
    svc = services(request)
    principal = await _key_manager(request, svc)
    async with transaction(svc.sessions) as session:
        key = await _owned_key(session, principal, request.path_params["key_id"])
        if key.revoked_at is None:
            key.revoked_at = datetime.now(UTC)
        key_id, digest = key.id, key.key_hash
    await svc.auth.forget(key_id=key_id, digests=[digest])
    return Response(status_code=204)


async def rotate_key(request: Request) -> Response:
    """A new key with the old one's kind, scope and name; the old one is revoked."""
    svc = services(request)
    principal = await _key_manager(request, svc)
    async with transaction(svc.sessions) as session:
        old = await _owned_key(session, principal, request.path_params["key_id"])
        if old.revoked_at is not None:
            raise InvalidRequest(f"key {old.id} is revoked already; create a new one instead")
        minted = mint_key(old.kind)
        new = ApiKey(
            kind=old.kind,
            customer_id=old.customer_id,
            function_id=old.function_id,
            key_hash=minted.digest(svc.auth.pepper),
            prefix=minted.prefix,
            name=old.name,
            expires_at=old.expires_at,
        )
        old.revoked_at = datetime.now(UTC)
        session.add(new)
        await session.flush()
        await session.refresh(new)
        view = RotatedKey(**_key_fields(new, None), key=minted.plaintext, replaces=str(old.id))
        old_id, old_digest = old.id, old.key_hash
    await svc.auth.forget(key_id=old_id, digests=[old_digest])
    return JSONResponse(dump(view), status_code=201)


async def _key_manager(request: Request, svc: RouterServices) -> Principal:
    principal = await svc.auth.authenticate(request)
    if principal.kind is ApiKeyKind.FUNCTION:
        raise PermissionDenied("a function-scoped key cannot manage keys")
    return principal


async def _owned_key(session: Any, principal: Principal, raw: str) -> ApiKey:
    try:
        key_id = uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"key {raw!r} not found") from None
    key: ApiKey | None = await session.get(ApiKey, key_id, with_for_update=True)
    if key is None or (
        principal.kind is not ApiKeyKind.OPERATOR and key.customer_id != principal.customer_id
    ):
        raise NotFound(f"key {raw!r} not found")
    return key


async def _scope(
    session: Any, principal: Principal, body: KeyBody
) -> tuple[uuid.UUID | None, uuid.UUID | None, str | None]:
    """The customer and function a new key belongs to, as `principal` may grant."""
    kind = body.kind
    if principal.kind is ApiKeyKind.FUNCTION:
        raise PermissionDenied("a function-scoped key cannot create keys")
    if kind is ApiKeyKind.OPERATOR:
        if principal.kind is not ApiKeyKind.OPERATOR:
            raise PermissionDenied("only an operator key can create operator keys")
        return None, None, None
    if principal.kind is ApiKeyKind.OPERATOR:
        if body.customer_id is None:
            raise InvalidRequest("say whose key it is: customer_id")
        customer_id = body.customer_id
        if await session.get(Customer, customer_id) is None:
            raise NotFound(f"customer {customer_id} not found")
    else:
        assert principal.customer_id is not None
        customer_id = principal.customer_id
        if body.customer_id is not None and body.customer_id != customer_id:
            raise NotFound(f"customer {str(body.customer_id)!r} not found")
    if kind is ApiKeyKind.ACCOUNT:
        return customer_id, None, None
    target = body.function
    app, slash, name = str(target or "").partition("/")
    if not slash or not app or not name:
        raise InvalidRequest(
            f"function={target!r} is not valid: a function-scoped key needs the APP/NAME it may "
            "call (a class: APP/Class)"
        )
    function_id = await session.scalar(
        sa.select(Function.id)
        .join(App, App.id == Function.app_id)
        .where(App.customer_id == customer_id, App.name == app, Function.name == name)
    )
    if function_id is None:
        raise NotFound(f"function {app}/{name} not found")
    return customer_id, function_id, f"{app}/{name}"


def _expiry(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.now(UTC) + timedelta(seconds=seconds)


def _key_fields(key: ApiKey, function: str | None) -> dict[str, Any]:
    """A key's view (`kiln.router.views.Key`), as fields its subclasses add to."""
    return {
        "id": str(key.id),
        "kind": key.kind,
        "customer_id": str(key.customer_id) if key.customer_id else None,
        "function": function,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": key.created_at.isoformat(),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }
