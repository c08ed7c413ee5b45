"""`WS /v1/realtime?model=NAME`: a real-time voice session with a deployment serving the realtime
task (`@kiln.websocket(task="realtime")`, such as the catalog's `voice-agent`).

The session is an ordinary WebSocket session (`kiln.router.websocket`): pinned to one replica,
frames carried both ways with credits, never scaled down mid-call, billed as replica time. What
this route adds is OpenAI's side of it: `model` names the deployment as on the other OpenAI
routes, a refusal before the upgrade is OpenAI's error body, and each answer's timings (the
`kiln.turn` report of the agent's `response.done` events) become Prometheus histograms and the
session's `voice_turns` in the invocation log. Only those events are decoded; the audio frames
pass through untouched.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from kiln.errors import InvalidRequest, KilnError
from kiln.functions.tasks import Task
from kiln.router.auth import Principal
from kiln.router.catalog import FunctionRoute
from kiln.router.openai.errors import openai_body
from kiln.router.openai.models import resolve_model
from kiln.router.services import RouterServices
from kiln.router.websocket import Bridge, serve_session

__all__ = ["realtime"]

_log = logging.getLogger(__name__)
_DONE = b'{"type":"response.done"'
_MAX_TURNS_LOGGED = 200  # per session, in its invocation log row
_STAGES = ("transcript", "first_token", "first_audio")


async def realtime(websocket: WebSocket) -> None:
    await serve_session(websocket, resolve=_resolve, refusal=_refusal, bridge=_VoiceBridge)


async def _resolve(
    websocket: WebSocket, svc: RouterServices, principal: Principal
) -> tuple[FunctionRoute, str | None]:
    model = websocket.query_params.get("model", "").strip()
    if not model:
        raise InvalidRequest(
            "model is required: open /v1/realtime?model=NAME with the name of one of your "
            "voice deployments",
            param="model",
        )
    return await resolve_model(svc, principal, model, Task.REALTIME)


def _refusal(websocket: WebSocket, error: KilnError) -> Response:
    return JSONResponse(openai_body(error), status_code=error.status)


class _VoiceBridge(Bridge):
    """Counts each answer's timings as its `response.done` goes by."""

    def seen(self, text: bytes) -> None:
        if not text.startswith(_DONE):
            return
        try:
            event = json.loads(text)
            status = str(event["response"]["status"])
            turn: dict[str, Any] = event.get("kiln", {}).get("turn", {})
        except (ValueError, KeyError, TypeError, AttributeError):
            _log.warning("session %s: a response.done the router cannot read", self.link.call_id)
            return
        stages = {
            stage: float(turn[f"{stage}_ms"]) / 1000
            for stage in _STAGES
            if isinstance(turn.get(f"{stage}_ms"), int | float)
        }
        route = self.watch.route
        self.svc.metrics.observe_voice_turn(
            route.app, route.spec.name, status, stages, bool(turn.get("barge_in"))
        )
        turns = self.watch.voice_turns
        if turns is None:
            turns = self.watch.voice_turns = []
        if len(turns) < _MAX_TURNS_LOGGED:
            turns.append({"status": status, **turn})
