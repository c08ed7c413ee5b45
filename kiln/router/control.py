"""The control API: deploy, list and remove apps; inspect functions and their replicas; change
scaling settings live."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.db.enums import LIVE_REPLICA_STATES, ReplicaState, ScalingSetting
from kiln.db.models import App, AppVersion, Function, Replica
from kiln.db.session import transaction
from kiln.errors import InvalidRequest, NotFound, PermissionDenied
from kiln.router.auth import Principal
from kiln.router.bodies import FunctionPatch
from kiln.router.deploy import DeployRequest, ReplicaCap
from kiln.router.run import read_body
from kiln.router.services import RouterServices, services
from kiln.router.validation import parse_json, path_text, read_model
from kiln.router.views import (
    AppList,
    AppView,
    Deployed,
    Endpoint,
    FunctionList,
    FunctionView,
    ReplicaList,
    ReplicaView,
    dump,
)

__all__ = [
    "control_principal",
    "delete_app",
    "deploy_app",
    "get_function",
    "list_apps",
    "list_functions",
    "list_replicas",
    "owned_function",
    "patch_function",
]


async def control_principal(request: Request) -> Principal:
    principal = await services(request).auth.authenticate(request)
    if principal.function_id is not None:
        raise PermissionDenied("a function-scoped key can only call its function")
    return principal


def _parse_deploy(body: bytes) -> DeployRequest:
    return DeployRequest.from_json(parse_json(body))


def _url(request: Request, app: str, name: str) -> str:
    return str(request.base_url).rstrip("/") + f"/v1/run/{app}/{name}"


async def deploy_app(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    body = await read_body(request, svc.settings.max_request_bytes)
    # Decoding and hashing an archive of megabytes would stall every other request.
    deploy = await asyncio.to_thread(_parse_deploy, body)
    result = await svc.deployer.deploy(principal.owner_id, deploy, cap=replica_cap(svc, principal))
    svc.catalog.invalidate()
    endpoints = []
    for spec in result.functions:
        names = (
            [spec.name]
            if spec.kind.value == "function"
            else [f"{spec.name}.{method}" for method in spec.entries]
        )
        endpoints += [Endpoint(name=n, url=_url(request, result.app, n)) for n in names]
    deployed = Deployed(
        app=result.app,
        version=result.version,
        unchanged=result.unchanged,
        endpoints=endpoints,
        kept_settings=result.kept,
    )
    return JSONResponse(dump(deployed), status_code=200 if result.unchanged else 201)


async def list_apps(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    async with transaction(svc.sessions) as session:
        rows = await session.execute(
            sa.select(App, AppVersion)
            .outerjoin(AppVersion, App.current_version_id == AppVersion.id)
            .where(App.customer_id == principal.owner_id)
            .order_by(App.name)
        )
        apps = [
            AppView(
                name=app.name,
                state=app.state,
                version=version.version if version else None,
                digest=version.source_digest if version else None,
                updated_at=app.updated_at.isoformat(),
            )
            for app, version in rows
        ]
    return JSONResponse(dump(AppList(apps=apps)))


async def delete_app(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    await svc.deployer.delete_app(principal.owner_id, path_text(request, "app"))
    svc.catalog.invalidate()
    return Response(status_code=204)


def _function_view(
    app: str, function: Function, live: int, last_error: str | None = None
) -> FunctionView:
    return FunctionView(
        app=app,
        name=function.name,
        kind=function.kind,
        gpu=function.gpu,
        min_replicas=function.min_replicas,
        max_replicas=function.max_replicas,
        buffer_replicas=function.buffer_replicas,
        idle_timeout=function.idle_timeout_s,
        concurrency=function.concurrency,
        target_concurrency=function.target_concurrency,
        timeout=function.timeout_s,
        startup_timeout=function.startup_timeout_s,
        overridden=list(function.overridden),
        replicas=live,
        # Why its newest replica failed, while that is the newest news: a function that
        # cannot start says so here instead of crash-looping silently (it is retried with
        # backoff meanwhile).
        last_error=last_error,
    )


def _live_count() -> sa.ScalarSelect[int]:
    return (
        sa.select(sa.func.count())
        .where(Replica.function_id == Function.id, Replica.state.in_(LIVE_REPLICA_STATES))
        .scalar_subquery()
    )


def _last_error() -> sa.ScalarSelect[str | None]:
    """The error of the function's most recently started replica, if that one failed."""
    return (
        sa.select(sa.case((Replica.state == ReplicaState.FAILED, Replica.error), else_=None))
        .where(Replica.function_id == Function.id)
        .order_by(Replica.started_at.desc())
        .limit(1)
        .scalar_subquery()
    )


async def list_functions(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    async with transaction(svc.sessions) as session:
        rows = await session.execute(
            sa.select(App.name, Function, _live_count(), _last_error())
            .join(App, Function.app_id == App.id)
            .where(App.customer_id == principal.owner_id)
            .order_by(App.name, Function.name)
        )
        functions = [_function_view(*row) for row in rows]
    return JSONResponse(dump(FunctionList(functions=functions)))


def _find_function(
    request: Request, principal: Principal, *, lock: bool = False
) -> tuple[str, sa.Select[Function]]:
    app = path_text(request, "app")
    name = path_text(request, "name")
    query = (
        sa.select(Function)
        .join(App, Function.app_id == App.id)
        .where(App.customer_id == principal.owner_id, App.name == app, Function.name == name)
    )
    return app, query.with_for_update(of=Function) if lock else query


async def _one(
    session: AsyncSession, query: sa.Select[Function], request: Request, app: str
) -> Function:
    function = await session.scalar(query)
    if function is None:
        raise NotFound(f"function {request.path_params['name']!r} not found in app {app!r}")
    return function


async def owned_function(session: AsyncSession, request: Request, principal: Principal) -> Function:
    """The function `{app}/{name}` of the request's path among the caller's own (404 if
    none)."""
    app, query = _find_function(request, principal)
    return await _one(session, query, request, app)


async def get_function(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    app, query = _find_function(request, principal)
    async with transaction(svc.sessions) as session:
        row = (await session.execute(query.add_columns(_live_count(), _last_error()))).first()
    if row is None:
        raise NotFound(f"function {request.path_params['name']!r} not found in app {app!r}")
    function, live, last_error = row
    return JSONResponse(dump(_function_view(app, function, live, last_error)))


_PATCHABLE = {
    "min_replicas": ScalingSetting.MIN_REPLICAS,
    "max_replicas": ScalingSetting.MAX_REPLICAS,
    "buffer_replicas": ScalingSetting.BUFFER_REPLICAS,
    "idle_timeout": ScalingSetting.IDLE_TIMEOUT_S,
    "concurrency": ScalingSetting.CONCURRENCY,
    "target_concurrency": ScalingSetting.TARGET_CONCURRENCY,
    "timeout": ScalingSetting.TIMEOUT_S,
    "startup_timeout": ScalingSetting.STARTUP_TIMEOUT_S,
}


async def patch_function(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    patch = await read_model(request, FunctionPatch)
    changes = {key: getattr(patch, key) for key in patch.model_fields_set}
    app, query = _find_function(request, principal, lock=True)
    try:
        async with transaction(svc.sessions) as session:
            function = await _one(session, query, request, app)
            for key, value in changes.items():
                setting = _PATCHABLE[key]
                setattr(function, setting.value, value)
                if setting.value not in function.overridden:
                    function.overridden = [*function.overridden, setting.value]
            problem = scaling_problem(function, cap=replica_cap(svc, principal))
            if problem is not None:
                raise InvalidRequest(problem)  # the transaction rolls back: nothing changes
            await session.flush()
            live = await session.scalar(sa.select(_live_count()).where(Function.id == function.id))
            view = _function_view(app, function, live or 0)
    except IntegrityError as exc:
        raise InvalidRequest(
            f"the new settings contradict each other ({_constraint(exc)}): e.g. min_replicas "
            "must not exceed max_replicas, and target_concurrency not exceed concurrency"
        ) from None
    svc.catalog.invalidate()
    return JSONResponse(dump(view))


def replica_cap(svc: RouterServices, principal: Principal) -> ReplicaCap:
    """The most replicas a function of this caller's may have: the platform's cap, or their
    tier's when lower."""
    platform = svc.settings.max_replicas
    if principal.limits is not None and principal.limits.max_replicas < platform:
        return ReplicaCap(principal.limits.max_replicas, f"the {principal.tier} tier allows")
    return ReplicaCap(platform, "this platform allows")


def scaling_problem(function: Function, *, cap: ReplicaCap) -> str | None:
    """What is wrong with a function's scaling settings taken together, in words that name the
    values; None when they fit. (The database's constraints say the same, less clearly.)
    `cap` is the most replicas the caller may give one function."""
    f = function
    if f.max_replicas < 1:
        return f"max_replicas={f.max_replicas} is not valid: a function needs at least 1"
    if f.max_replicas > cap.limit:
        plural = "s" if cap.limit != 1 else ""
        return (
            f"max_replicas={f.max_replicas} is not valid: {cap.who} at most {cap.limit} "
            f"replica{plural} per function"
        )
    if f.min_replicas > f.max_replicas:
        return (
            f"min_replicas={f.min_replicas} is above max_replicas={f.max_replicas}: raise "
            "max_replicas or lower min_replicas"
        )
    if f.concurrency < 1:
        return f"concurrency={f.concurrency} is not valid: a replica takes at least 1 call"
    if not 1 <= f.target_concurrency <= f.concurrency:
        return (
            f"target_concurrency={f.target_concurrency} must be from 1 to concurrency="
            f"{f.concurrency}"
        )
    for name, value in (("timeout", f.timeout_s), ("startup_timeout", f.startup_timeout_s)):
        if value < 1:
            return f"{name}={value} is not valid: expected at least 1 second"
    return None


def _constraint(exc: IntegrityError) -> str:
    name = getattr(getattr(exc.orig, "__cause__", None), "constraint_name", None)
    return str(name or "a constraint failed")


async def list_replicas(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    app, query = _find_function(request, principal)
    async with transaction(svc.sessions) as session:
        function = await _one(session, query, request, app)
        replicas = await session.scalars(
            sa.select(Replica)
            .where(Replica.function_id == function.id, Replica.state.in_(LIVE_REPLICA_STATES))
            .order_by(Replica.started_at)
        )
        now = datetime.now(UTC)
        views = [
            ReplicaView(
                id=str(r.id),
                state=r.state,
                node=r.node_id,
                gpu=r.gpu_type,
                gpu_indices=list(r.gpu_indices),
                in_flight=r.in_flight,
                origin=r.origin,
                started_at=r.started_at.isoformat(),
                ready_at=r.ready_at.isoformat() if r.ready_at else None,
                uptime_s=round((now - r.started_at).total_seconds(), 1),
                # As of its last heartbeat the scheduler recorded (within about a second).
                idle_s=(
                    round((now - r.idle_since).total_seconds(), 1)
                    if r.idle_since is not None and r.in_flight == 0
                    else None
                ),
            )
            for r in replicas
        ]
    return JSONResponse(dump(ReplicaList(replicas=views)))
