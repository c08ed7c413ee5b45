"""The model catalog over HTTP: `GET /v1/catalog` lists its entries; `POST /v1/deployments`
deploys one as an app of the caller's; `GET /v1/deployments[/ID]` and `DELETE
/v1/deployments/ID` show and remove those apps (`kiln stop` removes them too: they are apps).

A deployment's id is its app's; its `model` (what OpenAI's client sends) is its name.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.catalog.apps import APP_FILE, CatalogChoice, package_choice
from kiln.catalog.entries import ENTRIES, Entry
from kiln.db.enums import AppState, ReplicaState
from kiln.db.models import App, AppVersion, Function, Replica
from kiln.db.session import transaction
from kiln.errors import NotFound
from kiln.router.bodies import DeploymentBody
from kiln.router.control import control_principal, replica_cap
from kiln.router.deploy import DeployRequest
from kiln.router.run import read_body
from kiln.router.services import RouterServices, services
from kiln.router.validation import parse_json, path_text, validated

__all__ = [
    "catalog",
    "create_deployment",
    "delete_deployment",
    "get_deployment",
    "list_deployments",
]


def _entry_view(found: Entry, prices: dict[str, int], currency: str) -> dict[str, Any]:
    return {
        "slug": found.slug,
        "title": found.title,
        "task": found.task.value,
        "tasks": [t.value for t in found.tasks],
        "default_model": found.default_model,
        "default_gpu": found.default_gpu,
        "gpus": [
            {"gpu": gpu, "price_per_hour_micros": prices.get(gpu, prices.get("none", 0))}
            for gpu in found.gpus_that_fit()
        ],
        "currency": currency,
        "example": {
            "route": found.example.get("route"),
            "body": {"model": "NAME", **found.example.get("body", {})},
        },
    }


async def catalog(request: Request) -> Response:
    """`GET /v1/catalog`: what `POST /v1/deployments` can deploy, with prices."""
    svc = services(request)
    await svc.auth.authenticate(request)
    prices = dict(svc.settings.gpu_prices)
    data = [_entry_view(e, prices, svc.settings.currency) for e in ENTRIES.values()]
    return JSONResponse({"object": "list", "data": data})


def base_url(request: Request) -> str:
    """What OpenAI's client takes as `base_url` for this Kiln."""
    return str(request.base_url).rstrip("/") + "/v1"


async def create_deployment(request: Request) -> Response:
    """`POST /v1/deployments`: 201 with the deployment (200 when it was there already, the same)."""
    svc = services(request)
    principal = await control_principal(request)
    body = validated(
        DeploymentBody, parse_json(await read_body(request, svc.settings.max_request_bytes))
    )
    choice = CatalogChoice(
        slug=body.catalog,
        name=body.name,
        model=body.model,
        gpu=body.gpu,
        min_replicas=body.min_replicas,
        max_replicas=body.max_replicas,
        idle_timeout_s=body.idle_timeout,
    )
    # Building the app imports the engine's module: not on the event loop.
    app, digest, archive, origin = await asyncio.to_thread(package_choice, choice)
    deploy = DeployRequest(
        app=app.name,
        digest=digest,
        entrypoint=APP_FILE,
        functions=app.spec(),
        archive=archive,
        catalog=origin,
    )
    result = await svc.deployer.deploy(principal.owner_id, deploy, cap=replica_cap(svc, principal))
    svc.catalog.invalidate()
    view = await _one(svc, principal.owner_id, app.name, request)
    return JSONResponse(view, status_code=200 if result.unchanged else 201)


async def list_deployments(request: Request) -> Response:
    """`GET /v1/deployments`: the caller's catalog deployments, oldest first."""
    svc = services(request)
    principal = await control_principal(request)
    views = await _views(svc, principal.owner_id, request)
    return JSONResponse({"object": "list", "data": views})


async def get_deployment(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    view = await _one(svc, principal.owner_id, _id(request), request)
    return JSONResponse(view)


async def delete_deployment(request: Request) -> Response:
    """`DELETE /v1/deployments/ID`: stop its replicas and remove the app, as `kiln stop`."""
    svc = services(request)
    principal = await control_principal(request)
    view = await _one(svc, principal.owner_id, _id(request), request)
    await svc.deployer.delete_app(principal.owner_id, view["name"])
    svc.catalog.invalidate()
    return Response(status_code=204)


def _id(request: Request) -> str:
    return path_text(request, "deployment_id")


async def _one(svc: RouterServices, owner_id: uuid.UUID, key: str, request: Request) -> Any:
    """The deployment whose id or name is `key`."""
    for view in await _views(svc, owner_id, request):
        if key in (view["id"], view["name"]):
            return view
    raise NotFound(f"deployment {key!r} not found; GET /v1/deployments lists yours")


async def _views(svc: RouterServices, owner_id: uuid.UUID, request: Request) -> list[Any]:
    live = (ReplicaState.STARTING, ReplicaState.RESTORING, ReplicaState.READY)
    async with transaction(svc.sessions) as session:
        rows = (
            await session.execute(
                sa.select(App, AppVersion, Function)
                .join(AppVersion, App.current_version_id == AppVersion.id)
                .join(Function, Function.app_id == App.id)
                .where(App.customer_id == owner_id, App.state == AppState.ACTIVE)
                .order_by(App.created_at, App.name)
            )
        ).all()
        function_ids = [function.id for _, _, function in rows]
        states = (
            await session.execute(
                sa.select(Replica.function_id, Replica.state, sa.func.count())
                .where(Replica.function_id.in_(function_ids), Replica.state.in_(live))
                .group_by(Replica.function_id, Replica.state)
            )
        ).all()
    counts: dict[uuid.UUID, dict[str, int]] = {}
    for function_id, state, count in states:
        counts.setdefault(function_id, {})[state.value] = count
    views = []
    for app, version, function in rows:
        origin = version.spec.get("catalog")
        if not isinstance(origin, dict):
            continue  # an app deployed from code, not from the catalog
        replicas = counts.get(function.id, {})
        views.append(
            {
                "id": str(app.id),
                "object": "deployment",
                "name": app.name,
                "catalog": origin.get("slug"),
                "model": app.name,
                "served_model": origin.get("model"),
                "task": origin.get("task"),
                "gpu": function.gpu,
                "min_replicas": function.min_replicas,
                "max_replicas": function.max_replicas,
                "idle_timeout": function.idle_timeout_s,
                "replicas": replicas.get(ReplicaState.READY.value, 0),
                "status": _status(replicas),
                "version": version.version,
                "created_at": app.created_at.isoformat(),
                "base_url": base_url(request),
            }
        )
    return views


def _status(replicas: dict[str, int]) -> str:
    if replicas.get(ReplicaState.READY.value):
        return "ready"
    if replicas:
        return "starting"
    return "scaled_to_zero"
