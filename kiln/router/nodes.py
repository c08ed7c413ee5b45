"""For operators: `GET /v1/nodes`, the hosts and what runs on them (replicas, GPUs in use), and
`GET /v1/queues`, each active function's calls waiting or running (read from its JetStream
consumer, the same number the scheduler scales by)."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.db.enums import LIVE_REPLICA_STATES, AppState
from kiln.db.models import App, Function, Node, Replica
from kiln.db.session import transaction
from kiln.router.access import require_operator
from kiln.router.services import RouterServices, services
from kiln.router.views import NodeList, NodeReplica, NodeView, QueueList, QueueView, dump
from kiln.streams import queue_depth

__all__ = ["list_nodes", "list_queues"]


async def _operator(request: Request) -> RouterServices:
    await require_operator(request, "nodes and queues are for operator keys")
    return services(request)


async def list_nodes(request: Request) -> Response:
    svc = await _operator(request)
    async with transaction(svc.sessions) as session:
        nodes = (await session.scalars(sa.select(Node).order_by(Node.id))).all()
        rows = await session.execute(
            sa.select(Replica, Function.name, App.name, App.customer_id)
            .join(Function, Replica.function_id == Function.id)
            .join(App, Function.app_id == App.id)
            .where(Replica.state.in_(LIVE_REPLICA_STATES))
            .order_by(Replica.started_at)
        )
        on: dict[str, list[NodeReplica]] = {}
        used: dict[str, int] = {}
        for replica, function, app, customer_id in rows:
            on.setdefault(replica.node_id, []).append(
                NodeReplica(
                    id=str(replica.id),
                    function=f"{app}/{function}",
                    customer_id=str(customer_id),
                    state=replica.state,
                    gpu_indices=list(replica.gpu_indices),
                    in_flight=replica.in_flight,
                )
            )
            used[replica.node_id] = used.get(replica.node_id, 0) + len(replica.gpu_indices)
        views = [
            NodeView(
                id=n.id,
                hostname=n.hostname,
                state=n.state,
                gpu_type=n.gpu_type,
                gpu_count=n.gpu_count,
                gpus_used=used.get(n.id, 0),
                cpu_slots=n.cpu_slots,
                last_heartbeat_at=n.last_heartbeat_at.isoformat() if n.last_heartbeat_at else None,
                replicas=on.get(n.id, []),
            )
            for n in nodes
        ]
    return JSONResponse(dump(NodeList(nodes=views)))


async def list_queues(request: Request) -> Response:
    svc = await _operator(request)
    live = (
        sa.select(sa.func.count())
        .where(Replica.function_id == Function.id, Replica.state.in_(LIVE_REPLICA_STATES))
        .scalar_subquery()
    )
    async with transaction(svc.sessions) as session:
        rows = (
            await session.execute(
                sa.select(Function.id, Function.name, App.name, App.customer_id, live)
                .join(App, Function.app_id == App.id)
                .where(App.state == AppState.ACTIVE)
                .order_by(App.name, Function.name)
            )
        ).all()
    js = svc.dispatcher.nc.jetstream()
    ns = svc.settings.namespace
    depths = await asyncio.gather(*(queue_depth(js, ns, row[0].hex) for row in rows))
    views = [_queue(row, depth) for row, depth in zip(rows, depths, strict=True)]
    return JSONResponse(dump(QueueList(queues=views)))


def _queue(row: Any, depth: int) -> QueueView:
    _, function, app, customer_id, replicas = row
    return QueueView(
        function=f"{app}/{function}", customer_id=str(customer_id), queued=depth,
        replicas=replicas,
    )  # fmt: skip
