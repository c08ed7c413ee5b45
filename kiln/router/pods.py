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
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from kiln.db.enums import ACTIVE_POD_STATES, PodKind, PodState
from kiln.db.models import App, Function, Pod
from kiln.db.session import transaction
from kiln.errors import Conflict, InvalidRequest, KilnError, NotFound
from kiln.pods.terminal_session import TerminalRequest
from kiln.router.auth import Principal
from kiln.router.bodies import PodBody
from kiln.router.catalog import FunctionRoute
from kiln.router.control import control_principal
from kiln.router.errors import error_response
from kiln.router.run import read_body
from kiln.router.services import RouterServices, services
from kiln.router.validation import parse_json, storable_text, validated
from kiln.router.websocket import serve_session
from kiln.wire import TERMINAL_METHOD

__all__ = ["create_pod", "delete_pod", "get_pod", "list_pods", "pod_terminal"]


async def create_pod(request: Request) -> Response:
    """`POST /v1/pods`: 201 with the pod, starting."""
    svc = services(request)
    principal = await control_principal(request)
    body = validated(PodBody, parse_json(await read_body(request, svc.settings.max_request_bytes)))
    svc.billing.check(principal.customer_id)  # 402: a pod is billed from its start
    app, _, name = body.shell.partition("/")
    route = await svc.catalog.resolve(principal.owner_id, app, name)
    pod = Pod(
        id=uuid.uuid4(),
        customer_id=principal.owner_id,
        name=body.name or f"shell-{secrets.token_hex(3)}",
        kind=PodKind.SHELL,
        function_id=route.function_id,
        state=PodState.STARTING,
        replica_id=uuid.uuid4(),
    )
    async with transaction(svc.sessions) as session:
        taken = await session.scalar(
            sa.select(Pod.id).where(
                Pod.customer_id == pod.customer_id,
                Pod.name == pod.name,
                Pod.state != PodState.ENDED,
            )
        )
        if taken is not None:
            raise Conflict(f"a pod named {pod.name!r} exists already: choose another name")
        session.add(pod)
    await svc.dispatcher.wake_scheduler(route.function_id)
    return JSONResponse(await _view(svc, pod.id, principal), status_code=201)


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
    return JSONResponse(await _view(svc, _pod_id(request), principal))


async def delete_pod(request: Request) -> Response:
    """`DELETE /v1/pods/ID`: it ends; its replica stops (a terminal open on it is hung up)."""
    svc = services(request)
    principal = await control_principal(request)
    pod_id = _pod_id(request)
    async with transaction(svc.sessions) as session:
        pod = await session.scalar(
            sa.select(Pod).where(Pod.id == pod_id, *_owned(principal)).with_for_update()
        )
        if pod is None:
            raise _not_found(pod_id)
        if pod.state != PodState.ENDED:
            pod.state = PodState.ENDED
            pod.ended_at = datetime.now(UTC)
        function_id = pod.function_id
    await svc.dispatcher.wake_scheduler(function_id)
    return Response(status_code=204)


async def pod_terminal(websocket: WebSocket) -> None:
    """`WS /v1/pods/ID/terminal` (kiln.pods.terminal_session has the protocol)."""
    await serve_session(
        websocket, resolve=_resolve_terminal, refusal=error_response, pod=_terminal_replica
    )


async def _resolve_terminal(
    websocket: WebSocket, svc: RouterServices, principal: Principal
) -> tuple[FunctionRoute, str | None]:
    if principal.function_id is not None:
        raise NotFound("a function-scoped key reaches no pod")
    TerminalRequest(websocket.query_params)  # 400 before the upgrade for a bad size
    pod_id = _pod_id(websocket)
    async with transaction(svc.sessions) as session:
        row = (
            await session.execute(
                sa.select(Pod, App.name, Function.name)
                .join(Function, Function.id == Pod.function_id)
                .join(App, App.id == Function.app_id)
                .where(Pod.id == pod_id, *_owned(principal))
            )
        ).one_or_none()
    if row is None:
        raise _not_found(pod_id)
    pod, app, name = row
    if pod.state not in ACTIVE_POD_STATES:
        raise Conflict(f"pod {pod_id} is {pod.state.value}: start it first")
    route = await svc.catalog.resolve(pod.customer_id, app, name)
    websocket.state.pod_replica = pod.replica_id
    return route, TERMINAL_METHOD


def _terminal_replica(websocket: WebSocket) -> uuid.UUID:
    replica: uuid.UUID = websocket.state.pod_replica
    return replica


# Rows and views ------------------------------------------------------------------------------


def _owned(principal: Principal) -> tuple[Any, ...]:
    """Operators see every pod; a customer only its own."""
    if principal.customer_id is None:
        return ()
    return (Pod.customer_id == principal.customer_id,)


def _pods(principal: Principal) -> sa.Select[Pod, str, str, str]:
    return (
        sa.select(Pod, App.name, Function.name, Function.gpu)
        .join(Function, Function.id == Pod.function_id)
        .join(App, App.id == Function.app_id)
        .where(*_owned(principal))
    )


async def _view(svc: RouterServices, pod_id: uuid.UUID, principal: Principal) -> dict[str, Any]:
    async with transaction(svc.sessions) as session:
        row = (await session.execute(_pods(principal).where(Pod.id == pod_id))).one_or_none()
    if row is None:
        raise _not_found(pod_id)
    pod, app, name, gpu = row
    return _dump(pod, app, name, gpu)


def _dump(pod: Pod, app: str, name: str, gpu: str) -> dict[str, Any]:
    def moment(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": str(pod.id),
        "object": "pod",
        "name": pod.name,
        "kind": pod.kind.value,
        "function": f"{app}/{name}",
        "gpu": gpu,
        "state": pod.state.value,
        "replica_id": str(pod.replica_id),
        "node_id": pod.node_id,
        "created_at": moment(pod.created_at),
        "started_at": moment(pod.started_at),
        "ended_at": moment(pod.ended_at),
        "error": pod.error,
        "terminal": f"/v1/pods/{pod.id}/terminal",
    }


def _pod_id(connection: HTTPConnection) -> uuid.UUID:
    text = str(connection.path_params["pod_id"])
    if not storable_text(text):
        raise InvalidRequest(f"pod_id={text!r} is not valid: expected a pod's id")
    try:
        return uuid.UUID(text)
    except ValueError:
        raise NotFound(f"pod {text!r} not found; GET /v1/pods lists yours") from None


def _not_found(pod_id: uuid.UUID) -> KilnError:
    return NotFound(f"pod {pod_id} not found; GET /v1/pods lists yours")
