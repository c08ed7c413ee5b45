"""The OpenAI-compatible routes: OpenAI's request and answer shapes, its streaming chunks and its
error body, served by the task methods of the caller's deployments (`@kiln.method(task=...)`,
and the model catalog's apps). Everything a call through `/v1/run` gets applies: keys, billing,
limits, the invocation log, scaling and cold starts from snapshots."""

from __future__ import annotations

from starlette.routing import Route, WebSocketRoute

from kiln.router.openai.audio import speech, transcriptions
from kiln.router.openai.chat import chat_completions, completions
from kiln.router.openai.embeddings import embeddings, images
from kiln.router.openai.models import get_model, list_models
from kiln.router.openai.realtime import realtime

__all__ = ["OPENAI_ROUTES"]

OPENAI_ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/images/generations", images, methods=["POST"]),
    Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
    Route("/v1/audio/speech", speech, methods=["POST"]),
    WebSocketRoute("/v1/realtime", realtime),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
