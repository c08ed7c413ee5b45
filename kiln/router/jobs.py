"""Async jobs: `POST /v1/spawn/APP/NAME` → 202 with a call id, `GET /v1/calls/ID` (status and
result), `GET /v1/calls/ID/result` (the raw result) and `POST /v1/calls/ID/cancel`.

A spawn writes the job's row first, then stores the job in the function's queue (the row is
removed again if the queue refuses it, so nothing is half-made). `Idempotency-Key` makes a
spawn safe to repeat: the same key with the same request gives the same call id; with a
different request it is 422. Another customer's calls answer 404.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.db.enums import CallStatus
from kiln.db.models import App, Call, Function
from kiln.db.session import transaction
from kiln.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    Unprocessable,
)
from kiln.functions.spec import CallKind
from kiln.jobs.records import FINISHED, call_target, call_view, finish, is_expired
from kiln.objects import read_object
from kiln.router.bodies import SpawnQuery
from kiln.router.catalog import FunctionRoute
from kiln.router.errors import request_id
from kiln.router.run import classify, read_body, resolve_entry
from kiln.router.services import RouterServices, services
from kiln.router.validation import read_query
from kiln.router.views import CallView, Spawned, dump
from kiln.wire import JOB_ROUTER, StreamControl, encode

__all__ = ["cancel_call", "get_call", "get_result", "spawn"]

_MAX_KEY_CHARS = 255


async def spawn(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.authenticate(request)
    app = request.path_params["app"]
    route, entry, method = await resolve_entry(svc, principal, app, request.path_params["name"])
    if entry.kind is not CallKind.FUNCTION:
        raise InvalidRequest(
            f"{app}/{request.path_params['name']} is a {entry.kind.value}; only plain functions "
            "run as jobs (stream a generator with POST /v1/run)"
        )
    key = _idempotency_key(request)
    webhook = _webhook(request)
    body, content_type = classify(
        await read_body(request, svc.settings.max_request_bytes),
        request.headers.get("content-type", ""),
    )
    digest = hashlib.sha256(
        f"{route.function_id}|{method}|{content_type}|{webhook or ''}|".encode() + body
    ).hexdigest()
    job_id = uuid.uuid4()
    async with transaction(svc.sessions) as session:
        inserted = await session.scalar(
            insert(Call)
            .values(
                id=job_id,
                customer_id=principal.owner_id,
                function_id=route.function_id,
                version_id=route.version_id,
                bytes_in=len(body),
                status=CallStatus.QUEUED,
                idempotency_key=key,
                request_digest=digest,
                max_retries=route.spec.resources.retries,
                method=method or None,
                webhook_url=webhook,
            )
            .on_conflict_do_nothing(index_elements=[Call.customer_id, Call.idempotency_key])
            .returning(Call.id)
        )
        if inserted is None:  # the key was used before
            earlier = await session.scalar(
                sa.select(Call).where(
                    Call.customer_id == principal.owner_id, Call.idempotency_key == key
                )
            )
            assert earlier is not None
            if earlier.request_digest != digest:
                raise Unprocessable(
                    f"Idempotency-Key {key!r} was used for a different request (another "
                    "function, arguments or webhook); use a new key for a new job"
                )
            return _accepted(earlier.id, earlier.status)
    await _enqueue(svc, request, route.function_id, job_id, body, content_type, method, route)
    return _accepted(job_id, CallStatus.QUEUED)


async def _enqueue(
    svc: RouterServices,
    request: Request,
    function_id: uuid.UUID,
    job_id: uuid.UUID,
    body: bytes,
    content_type: str,
    method: str,
    route: FunctionRoute,
) -> None:
    payload = None
    try:
        if len(body) > svc.dispatcher.max_body_bytes:
            payload = await svc.dispatcher.payloads.put(function_id, body)
            body = b""
            async with transaction(svc.sessions) as session:
                await session.execute(
                    sa.update(Call).where(Call.id == job_id).values(body_ref=payload)
                )
        await svc.dispatcher.enqueue_job(
            function_id,
            str(job_id),
            body,
            content_type=content_type,
            method=method or None,
            timeout_s=route.timeout_s,
            request_id=request_id(request),
            generation=route.generation,
            payload=payload,
        )
    except BaseException:
        # Not queued: no row may say it is.
        async with transaction(svc.sessions) as session:
            await session.execute(sa.delete(Call).where(Call.id == job_id))
        if payload is not None:
            await svc.dispatcher.payloads.delete(function_id, payload)
        raise


def _accepted(job_id: uuid.UUID, status: CallStatus) -> Response:
    return JSONResponse(
        dump(Spawned(call_id=str(job_id), status=status)),
        status_code=202,
        headers={"Location": f"/v1/calls/{job_id}"},
    )


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key or len(key) > _MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {_MAX_KEY_CHARS} printable ASCII characters, such "
            "as a UUID"
        )
    return key


def _webhook(request: Request) -> str | None:
    url = read_query(request, SpawnQuery).webhook
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(
            f"webhook={url!r} is not valid: expected an http:// or https:// URL of at most "
            "2048 characters"
        )
    return url


async def _owned_query(request: Request, svc: RouterServices) -> sa.Select[Call, str, str]:
    """The call the path names, with its app and function names, if the caller owns it."""
    principal = await svc.auth.authenticate(request)
    raw = request.path_params["call_id"]
    try:
        call_id = uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"call {raw!r} not found") from None
    query = (
        sa.select(Call, App.name, Function.name)
        .join(Function, Function.id == Call.function_id)
        .join(App, App.id == Function.app_id)
        .where(Call.id == call_id, Call.customer_id == principal.owner_id)
    )
    if principal.function_id is not None:
        query = query.where(Call.function_id == principal.function_id)
    return query


async def _owned_call(request: Request, svc: RouterServices) -> tuple[Call, str]:
    query = await _owned_query(request, svc)
    async with transaction(svc.sessions) as session:
        row = (await session.execute(query)).first()
        if row is None:
            raise NotFound(f"call {request.path_params['call_id']!r} not found")
        call, app, function = row
        session.expunge(call)
    return call, call_target(app, function, call.method)


async def get_call(request: Request) -> Response:
    svc = services(request)
    call, target = await _owned_call(request, svc)
    return _call_answer(call_view(call, target, datetime.now(UTC)))


def _call_answer(view: dict[str, Any]) -> Response:
    """A job's view (`kiln.jobs.records.call_view`, which its webhook also sends), checked
    against its declared shape; `result_url` and `result` only where the view has them."""
    return JSONResponse(dump(CallView.model_validate(view), exclude_unset=True))


async def get_result(request: Request) -> Response:
    svc = services(request)
    call, _ = await _owned_call(request, svc)
    if is_expired(call, datetime.now(UTC)):
        raise NotFound(f"the result of call {call.id} has expired")
    if call.status is not CallStatus.SUCCEEDED:
        raise Conflict(f"call {call.id} has no result: it is {call.status.value}")
    body = call.result
    if body is None and call.result_ref is not None:
        bucket = svc.dispatcher.subjects.job_results_bucket(call.function_id)
        body = await read_object(svc.dispatcher.nc.jetstream(), bucket, call.result_ref)
    return Response(body or b"", media_type=call.result_content_type or "application/json")


async def cancel_call(request: Request) -> Response:
    svc = services(request)
    query = (await _owned_query(request, svc)).with_for_update(of=Call)
    now = datetime.now(UTC)
    async with transaction(svc.sessions) as session:
        row = (await session.execute(query)).first()
        if row is None:
            raise NotFound(f"call {request.path_params['call_id']!r} not found")
        call, app, function = row
        if call.status in FINISHED:
            raise Conflict(f"call {call.id} is already {call.status.value}")
        replica, call_id = call.replica_id, call.id
        finish(call, CallStatus.CANCELLED, now, svc.settings.job_result_ttl_s)
        view = call_view(call, call_target(app, function, call.method), now)
    # A replica about to start it skips it; one running it stops.
    js = svc.dispatcher.nc.jetstream()
    with contextlib.suppress(Exception):
        kv = await js.key_value(svc.dispatcher.subjects.job_cancels_bucket)
        await kv.put(str(call_id), b"1")
    if replica is not None:
        stop = StreamControl(JOB_ROUTER, str(call_id), cancel=True)
        with contextlib.suppress(Exception):
            await svc.dispatcher.nc.publish(
                svc.dispatcher.subjects.replica_control(replica), encode(stop)
            )
    return _call_answer(view)
