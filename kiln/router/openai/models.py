"""`model` on the OpenAI-compatible routes: which deployment of the caller's it names, and
`GET /v1/models`, the deployments the caller's key may call.

A model is named by its app (`qwen`), by `APP/NAME` when an app has several functions or classes
serving tasks, or by an alias (a catalog deployment's model id). Only the caller's own apps are
searched, and a function-scoped key sees only its function: anything else "does not exist", as
OpenAI says of a model one has no access to.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.errors import InvalidRequest, ModelNotFound
from kiln.functions.tasks import Task
from kiln.router.auth import Principal
from kiln.router.catalog import FunctionRoute, ServedTask
from kiln.router.openai.errors import openai_errors
from kiln.router.services import RouterServices, services

__all__ = ["get_model", "list_models", "resolve_model"]

# The route that serves each task, for the refusal of a model asked for the wrong one.
ROUTE_OF = {
    Task.CHAT: "/v1/chat/completions",
    Task.COMPLETIONS: "/v1/completions",
    Task.EMBEDDINGS: "/v1/embeddings",
    Task.IMAGE: "/v1/images/generations",
    Task.TRANSCRIPTION: "/v1/audio/transcriptions",
    Task.SPEECH: "/v1/audio/speech",
    Task.REALTIME: "WS /v1/realtime",
}


async def _visible(svc: RouterServices, principal: Principal) -> list[ServedTask]:
    served = await svc.catalog.served_tasks(principal.owner_id)
    if principal.function_id is not None:
        served = [s for s in served if s.function_id == principal.function_id]
    return served


def _names(served: ServedTask) -> tuple[str, ...]:
    return (served.app, f"{served.app}/{served.function}", *served.aliases)


async def resolve_model(
    svc: RouterServices, principal: Principal, model: str, task: Task
) -> tuple[FunctionRoute, str | None]:
    """The function `model` names for this caller and the method serving `task` (None for a
    plain function); `ModelNotFound` (404) or `InvalidRequest` (400), both with param "model"."""
    visible = await _visible(svc, principal)
    named = [s for s in visible if model in _names(s)]
    if not named:
        apps = sorted({s.app for s in visible})
        known = f"your models are {', '.join(apps)}" if apps else "`kiln catalog deploy` makes one"
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it; {known}",
            param="model",
        )
    apps = sorted({s.app for s in named})
    if len(apps) > 1:
        raise InvalidRequest(
            f"model '{model}' is an alias of several deployments ({', '.join(apps)}); name one "
            "of them instead",
            param="model",
        )
    fitting = [s for s in named if s.task == task]
    if not fitting:
        tasks = sorted({s.task for s in named})
        routes = ", ".join(ROUTE_OF[Task(t)] for t in tasks)
        raise InvalidRequest(
            f"model '{model}' serves {' and '.join(tasks)}, not {task.value}; call it at {routes}",
            param="model",
        )
    chosen = fitting[0]  # in definition order, when an app has several
    route = await svc.catalog.resolve(principal.owner_id, chosen.app, chosen.function)
    return route, chosen.method


def _model_view(app: str, served: list[ServedTask]) -> dict[str, object]:
    tasks = list(dict.fromkeys(s.task for s in served))
    return {
        "id": app,
        "object": "model",
        "created": int(min(s.created_at for s in served)),
        "owned_by": "you",
        "task": tasks[0],
        "tasks": tasks,
        "aliases": sorted({a for s in served for a in s.aliases}),
    }


def _by_app(served: list[ServedTask]) -> dict[str, list[ServedTask]]:
    apps: dict[str, list[ServedTask]] = {}
    for s in served:
        apps.setdefault(s.app, []).append(s)
    return apps


@openai_errors
async def list_models(request: Request) -> Response:
    """`GET /v1/models`: the caller's deployments that serve a task, in OpenAI's list shape."""
    svc = services(request)
    principal = await svc.auth.authenticate(request)
    apps = _by_app(await _visible(svc, principal))
    data = [_model_view(app, served) for app, served in apps.items()]
    return JSONResponse({"object": "list", "data": data})


@openai_errors
async def get_model(request: Request) -> Response:
    """`GET /v1/models/MODEL`: one of them, by name or alias."""
    svc = services(request)
    principal = await svc.auth.authenticate(request)
    model = request.path_params["model"]
    visible = await _visible(svc, principal)
    apps = _by_app([s for s in visible if model in _names(s)])
    if len(apps) != 1:
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it", param="model"
        )
    ((app, served),) = apps.items()
    return JSONResponse(_model_view(app, served))
