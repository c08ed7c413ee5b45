"""`POST /v1/embeddings` and `POST /v1/images/generations`: methods that answer once, in
OpenAI's list shapes. Vectors go back as JSON numbers, or with `encoding_format: "base64"` as
little-endian float32 bytes in base64 (what OpenAI's Python client asks for by default)."""

from __future__ import annotations

import array
import base64
import sys
import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.functions.tasks import Task, embeddings_from_wire, images_from_wire
from kiln.router.openai.calls import read_task_call
from kiln.router.openai.errors import openai_errors
from kiln.router.openai.requests import embeddings_call, image_call

__all__ = ["embeddings", "images"]


def _base64_floats(vector: Sequence[float]) -> str:
    packed = array.array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def _embedding_tokens(result: Any) -> tuple[int, int]:
    return embeddings_from_wire(result).prompt_tokens, 0


@openai_errors
async def embeddings(request: Request) -> Response:
    call = await read_task_call(request)
    asked = embeddings_call(call.body)
    result = embeddings_from_wire(
        await call.call(Task.EMBEDDINGS, asked.request, _embedding_tokens)
    )
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _base64_floats(vector) if asked.base64 else list(vector),
        }
        for i, vector in enumerate(result.vectors)
    ]
    tokens = result.prompt_tokens
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": asked.request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@openai_errors
async def images(request: Request) -> Response:
    call = await read_task_call(request)
    asked = image_call(call.body)
    result = images_from_wire(await call.call(Task.IMAGE, asked.request))
    return JSONResponse(
        {"created": int(time.time()), "data": [{"b64_json": image} for image in result]}
    )
