"""Pods and shells over HTTP: `POST /v1/pods` reserves one, `GET /v1/pods[/ID]` shows them,
`DELETE /v1/pods/ID` ends one, `WS /v1/pods/ID/terminal` is its terminal.

A pod is a row (`kiln.db.models_pods`) that the scheduler gives a replica of its function, out
of the autoscaler's reach; the row names the replica before it starts, so the terminal is
opened on it at once and waits for it like a call waits for a cold start. A customer sees and
reaches only its own pods: another's is 404, as if it did not exist.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from kiln.db.enums import ACTIVE_POD_STATES, AppState, NodeState, PodKind, PodState
from kiln.db.models import App, Function, Node, Pod
from kiln.db.session import transaction
from kiln.errors import Conflict, InvalidRequest, KilnError, NotFound
from kiln.functions.gpu import gpu_request, parse_gpu
from kiln.pods.base_app import APP_FILE, POD_APP, package_base_app
from kiln.pods.terminal_session import TerminalRequest
from kiln.router.auth import Principal
from kiln.router.bodies import PodBody
from kiln.router.catalog import FunctionRoute
from kiln.router.control import control_principal, replica_cap
from kiln.router.deploy import DeployRequest
from kiln.router.errors import error_response
from kiln.router.pod_limits import check_pod_room, locked_limits
from kiln.router.run import read_body
from kiln.router.services import RouterServices, services
from kiln.router.validation import parse_json, storable_text, validated
from kiln.router.websocket import serve_session
from kiln.wire import TERMINAL_METHOD

__all__ = [
    "active_pod",
    "create_pod",
    "delete_pod",
    "get_pod",
    "list_pods",
    "pod_id_of",
    "pod_not_found",
    "pod_terminal",
    "pods_owned_by",
    "start_pod",
    "stop_pod",
]


async def create_pod(request: Request) -> Response:
    """`POST /v1/pods`: 201 with the pod, starting."""
    svc = services(request)
    principal = await control_principal(request)
    body = validated(PodBody, parse_json(await read_body(request, svc.settings.max_request_bytes)))
    svc.billing.check(principal.customer_id)  # 402: a pod is billed from its start
    gpu = None
    if body.gpus is not None:
        try:
            gpu = parse_gpu(body.gpus)
        except ValueError as exc:
            raise InvalidRequest(f"gpu={body.gpus!r} is not valid: {exc}", param="gpu") from None
        await _capacity_for(svc, gpu)
    requirements: list[str] = []
    if body.shell is not None:
        kind = PodKind.SHELL
        app, _, name = body.shell.partition("/")
        function_id = (await svc.catalog.resolve(principal.owner_id, app, name)).function_id
    elif body.image is not None:
        kind = PodKind.POD
        await _containers_for(svc, gpu)
        function_id = await _environment(svc, principal.owner_id, await _base_app(svc, principal))
    else:
        assert body.environment is not None
        kind = PodKind.POD
        requirements = list(body.environment.requirements)
        app = body.environment.app or await _base_app(svc, principal)
        function_id = await _environment(svc, principal.owner_id, app)
    pod = Pod(
        id=uuid.uuid4(),
        customer_id=principal.owner_id,
        name=body.name or f"{kind.value}-{secrets.token_hex(3)}",
        kind=kind,
        function_id=function_id,
        gpu=gpu,
        state=PodState.STARTING,
        replica_id=uuid.uuid4(),
        ports=list(body.ports),
        volume_gb=body.volume_gb,
        requirements=requirements,
        image=body.image,
        auto_stop_s=body.auto_stop_s,
    )
    async with transaction(svc.sessions) as session:
        limits = await locked_limits(session, svc.settings.tier_limits, principal)
        taken = await session.scalar(
            sa.select(Pod.id).where(
                Pod.customer_id == pod.customer_id,
                Pod.name == pod.name,
                Pod.state != PodState.ENDED,
            )
        )
        if taken is not None:
            raise Conflict(f"a pod named {pod.name!r} exists already: choose another name")
        await check_pod_room(session, limits, customer_id=pod.customer_id,
                             function_id=function_id, gpu=gpu)  # fmt: skip
        session.add(pod)
    await svc.dispatcher.wake_scheduler(function_id)
    return JSONResponse(await _view(svc, pod.id, principal), status_code=201)


async def stop_pod(request: Request) -> Response:
    """`POST /v1/pods/ID/stop`: its replica stops and its slot is given back; the pod (and its
    volume) stays, to be started again."""
    svc = services(request)
    principal = await control_principal(request)
    pod_id = pod_id_of(request)
    async with transaction(svc.sessions) as session:
        pod = await _locked(session, pod_id, principal)
        if pod.kind == PodKind.SHELL:
            raise Conflict("a shell cannot be stopped, only ended: DELETE /v1/pods/ID")
        if pod.state not in ACTIVE_POD_STATES:
            raise Conflict(f"pod {pod_id} is {pod.state.value} already")
        pod.state, pod.stopped_at = PodState.STOPPED, datetime.now(UTC)
        function_id = pod.function_id
    await svc.dispatcher.wake_scheduler(function_id)
    return JSONResponse(await _view(svc, pod_id, principal))


async def start_pod(request: Request) -> Response:
    """`POST /v1/pods/ID/start`: a stopped pod gets a new replica."""
    svc = services(request)
    principal = await control_principal(request)
    svc.billing.check(principal.customer_id)
    pod_id = pod_id_of(request)
    async with transaction(svc.sessions) as session:
        # The customer's row first, the pod's second: the order every pod check locks in.
        limits = await locked_limits(session, svc.settings.tier_limits, principal)
        pod = await _locked(session, pod_id, principal)
        if pod.state != PodState.STOPPED:
            raise Conflict(f"pod {pod_id} is {pod.state.value}: only a stopped pod starts")
        if pod.function_id is None:  # not while it was stopped (deploy.delete_app refuses)
            raise Conflict(f"pod {pod_id}'s app was deleted: it cannot start")
        await check_pod_room(session, limits, customer_id=pod.customer_id,
                             function_id=pod.function_id, gpu=pod.gpu)  # fmt: skip
        pod.state, pod.replica_id, pod.node_id = PodState.STARTING, uuid.uuid4(), None
        pod.error, pod.failures = None, 0  # started by hand: its failed starts count anew
        function_id = pod.function_id
    await svc.dispatcher.wake_scheduler(function_id)
    return JSONResponse(await _view(svc, pod_id, principal))


async def _locked(session: AsyncSession, pod_id: uuid.UUID, principal: Principal) -> Pod:
    pod = await session.scalar(
        sa.select(Pod).where(Pod.id == pod_id, *pods_owned_by(principal)).with_for_update()
    )
    if pod is None:
        raise pod_not_found(pod_id)
    return pod


async def _environment(svc: RouterServices, owner_id: uuid.UUID, app: str) -> uuid.UUID:
    """The function whose code, environment and secrets a pod of `app` runs with: the app's
    first by name."""
    async with transaction(svc.sessions) as session:
        function_id = await session.scalar(
            sa.select(Function.id)
            .join(App, App.id == Function.app_id)
            .where(App.customer_id == owner_id, App.name == app, App.state == AppState.ACTIVE)
            .order_by(Function.name)
            .limit(1)
        )
    if function_id is None:
        raise NotFound(f"app {app!r} not found; GET /v1/apps lists yours", param="environment")
    return function_id


async def _base_app(svc: RouterServices, principal: Principal) -> str:
    """The app of pods that name none (`kiln.pods.base_app`), deployed into the caller's
    account unless it is there."""
    async with transaction(svc.sessions) as session:
        there = await session.scalar(
            sa.select(App.id).where(
                App.customer_id == principal.owner_id,
                App.name == POD_APP,
                App.state == AppState.ACTIVE,
            )
        )
    if there is None:
        app, digest, archive = package_base_app()
        deploy = DeployRequest(
            app=app.name, digest=digest, entrypoint=APP_FILE, functions=app.spec(),
            archive=archive,
        )  # fmt: skip
        await svc.deployer.deploy(principal.owner_id, deploy, cap=replica_cap(svc, principal))
        svc.catalog.invalidate()
    return POD_APP


async def _containers_for(svc: RouterServices, gpu: str | None) -> None:
    """400 unless some ready node runs container pods (with GPUs, when `gpu` asks for some)."""
    gpus = gpu is not None and gpu_request(gpu)[0] != "none"
    async with transaction(svc.sessions) as session:
        labels = (
            await session.scalars(sa.select(Node.labels).where(Node.state == NodeState.READY))
        ).all()
    if any(n.get("containers") and (n.get("gpu_containers") or not gpus) for n in labels):
        return
    needs = "Docker and the NVIDIA container toolkit" if gpus else "Docker"
    raise InvalidRequest(
        f"image: no node runs container pods{' with GPUs' if gpus else ''} (nodes need {needs}); "
        'run a pod of an environment instead, {"environment": {"requirements": [...]}}',
        param="image",
    )


async def _capacity_for(svc: RouterServices, gpu: str) -> None:
    """400 unless some node could hold `gpu`, naming what the nodes have."""
    kind, count = gpu_request(gpu)
    async with transaction(svc.sessions) as session:
        nodes = (
            await session.execute(
                sa.select(Node.gpu_type, Node.gpu_count, Node.cpu_slots).where(
                    Node.state == NodeState.READY
                )
            )
        ).all()
    fits = any(
        (kind == "none" and cpu > 0)
        or (kind != "none" and (kind == "any" or kind == gpu_type) and (gpus or 0) >= count)
        for gpu_type, gpus, cpu in nodes
    )
    if fits:
        return
    have = sorted({f"{t} x{n}" for t, n, _ in nodes if t} | {"CPU slots" for *_, c in nodes if c})
    raise InvalidRequest(
        f"gpu={gpu!r}: no node has that; the nodes have {', '.join(have) or 'nothing yet'}",
        param="gpu",
    )


async def list_pods(request: Request) -> Response:
    """`GET /v1/pods`: the caller's pods that have not ended, oldest first."""
    svc = services(request)
    principal = await control_principal(request)
    query = _pods(principal).where(Pod.state != PodState.ENDED).order_by(Pod.created_at)
    async with transaction(svc.sessions) as session:
        rows = (await session.execute(query)).all()
    return JSONResponse(
        {"object": "list", "data": [_dump(pod, app, name, gpu) for pod, app, name, gpu in rows]}
    )


async def get_pod(request: Request) -> Response:
    svc = services(request)
    principal = await control_principal(request)
    return JSONResponse(await _view(svc, pod_id_of(request), principal))


async def delete_pod(request: Request) -> Response:
    """`DELETE /v1/pods/ID`: it ends; its replica stops (a terminal open on it is hung up)."""
    svc = services(request)
    principal = await control_principal(request)
    pod_id = pod_id_of(request)
    async with transaction(svc.sessions) as session:
        pod = await session.scalar(
            sa.select(Pod).where(Pod.id == pod_id, *pods_owned_by(principal)).with_for_update()
        )
        if pod is None:
            raise pod_not_found(pod_id)
        if pod.state != PodState.ENDED:
            pod.state = PodState.ENDED
            pod.ended_at = datetime.now(UTC)
        function_id = pod.function_id
    await svc.dispatcher.wake_scheduler(function_id)
    return Response(status_code=204)


async def pod_terminal(websocket: WebSocket) -> None:
    """`WS /v1/pods/ID/terminal` (kiln.pods.terminal_session has the protocol)."""
    await serve_session(
        websocket, resolve=_resolve_terminal, refusal=error_response,
        pod=lambda ws: ws.state.pod_target,
    )  # fmt: skip


async def _resolve_terminal(
    websocket: WebSocket, svc: RouterServices, principal: Principal
) -> tuple[FunctionRoute, str | None]:
    TerminalRequest(websocket.query_params)  # 400 before the upgrade for a bad size
    pod, route = await active_pod(svc, principal, pod_id_of(websocket))
    websocket.state.pod_target = (pod.replica_id, dict(websocket.query_params))
    return route, TERMINAL_METHOD


# Rows and views ------------------------------------------------------------------------------


async def active_pod(
    svc: RouterServices, principal: Principal, pod_id: uuid.UUID, *, port: int | None = None
) -> tuple[Pod, FunctionRoute]:
    """The caller's pod and its function's route, for a session on its replica: 404 when it
    is not the caller's (or, given `port`, does not forward it), 409 unless it is active."""
    if principal.function_id is not None:
        raise NotFound("a function-scoped key reaches no pod")
    async with transaction(svc.sessions) as session:
        row = (await session.execute(
            sa.select(Pod, App.name, Function.name)
            .join(Function, Function.id == Pod.function_id)
            .join(App, App.id == Function.app_id)
            .where(Pod.id == pod_id, *pods_owned_by(principal))
        )).one_or_none()  # fmt: skip
    if row is None:
        raise pod_not_found(pod_id)
    pod, app, name = row
    if port is not None and port not in pod.ports:
        ports = ", ".join(map(str, pod.ports)) or "none"
        raise NotFound(f"pod {pod_id} forwards no port {port}; its ports: {ports}")
    if pod.state not in ACTIVE_POD_STATES:
        raise Conflict(f"pod {pod_id} is {pod.state.value}: start it first")
    return pod, await svc.catalog.resolve(pod.customer_id, app, name)


def pods_owned_by(principal: Principal) -> tuple[Any, ...]:
    """Operators see every pod; a customer only its own."""
    if principal.customer_id is None:
        return ()
    return (Pod.customer_id == principal.customer_id,)


def _pods(principal: Principal) -> sa.Select[Pod, str | None, str | None, str | None]:
    """With the function each runs (none for an ended pod whose app was deleted since)."""
    return (
        sa.select(Pod, App.name, Function.name, Function.gpu)
        .outerjoin(Function, Function.id == Pod.function_id)
        .outerjoin(App, App.id == Function.app_id)
        .where(*pods_owned_by(principal))
    )


async def _view(svc: RouterServices, pod_id: uuid.UUID, principal: Principal) -> dict[str, Any]:
    async with transaction(svc.sessions) as session:
        row = (await session.execute(_pods(principal).where(Pod.id == pod_id))).one_or_none()
    if row is None:
        raise pod_not_found(pod_id)
    pod, app, name, gpu = row
    return _dump(pod, app, name, gpu)


def _dump(pod: Pod, app: str | None, name: str | None, gpu: str | None) -> dict[str, Any]:
    def moment(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": str(pod.id),
        "object": "pod",
        "name": pod.name,
        "kind": pod.kind.value,
        "function": f"{app}/{name}" if app is not None else None,
        "gpu": pod.gpu or gpu,
        "ports": list(pod.ports),
        "volume_gb": pod.volume_gb,
        # In the store (moved off its node while stopped): the pod may start on any node.
        "volume_parked": pod.volume_node_id is None and pod.volume_key is not None,
        "requirements": list(pod.requirements),
        "image": pod.image,
        "state": pod.state.value,
        "replica_id": str(pod.replica_id),
        "node_id": pod.node_id,
        "created_at": moment(pod.created_at),
        "started_at": moment(pod.started_at),
        "stopped_at": moment(pod.stopped_at),
        "ended_at": moment(pod.ended_at),
        "error": pod.error,
        "auto_stop_hours": pod.auto_stop_s / 3600 if pod.auto_stop_s is not None else None,
        "active_at": moment(pod.active_at),
        "terminal": f"/v1/pods/{pod.id}/terminal",
    }


def pod_id_of(connection: HTTPConnection) -> uuid.UUID:
    text = str(connection.path_params["pod_id"])
    if not storable_text(text):
        raise InvalidRequest(f"pod_id={text!r} is not valid: expected a pod's id")
    try:
        return uuid.UUID(text)
    except ValueError:
        raise NotFound(f"pod {text!r} not found; GET /v1/pods lists yours") from None


def pod_not_found(pod_id: uuid.UUID) -> KilnError:
    return NotFound(f"pod {pod_id} not found; GET /v1/pods lists yours")
