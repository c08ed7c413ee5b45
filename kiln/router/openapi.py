"""The OpenAPI document served at `/openapi.json`."""

from __future__ import annotations

from functools import cache
from typing import Any

from kiln._version import __version__

__all__ = ["openapi_document"]

_ERROR = {
    "description": "An error in Kiln's one shape.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "request_id": {"type": "string"},
                        },
                        "required": ["code", "message", "request_id"],
                    }
                },
            }
        }
    },
}
_APP = {"name": "app", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(
    summary: str, *, params: tuple[dict[str, Any], ...] = (), ok: str = "200"
) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": list(params),
        "responses": {ok: {"description": "Success."}, "default": _ERROR},
    }


@cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": __version__},
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/run/{app}/{name}": {
                "post": _op(
                    "Call a function (NAME) or a class method (Class.method). A JSON object body "
                    "maps to keyword arguments; another body is passed as bytes.",
                    params=(_APP, _NAME),
                )
            },
            "/v1/apps": {
                "get": _op("List apps."),
                "post": _op("Deploy an app version (what `kiln deploy` sends).", ok="201"),
            },
            "/v1/apps/{app}": {"delete": _op("Stop and remove an app.", params=(_APP,), ok="204")},
            "/v1/functions": {"get": _op("List functions with their scaling settings.")},
            "/v1/functions/{app}/{name}": {
                "get": _op("One function's settings.", params=(_APP, _NAME)),
                "patch": _op(
                    "Change scaling settings live; they persist across redeploys.",
                    params=(_APP, _NAME),
                ),
            },
            "/v1/functions/{app}/{name}/replicas": {
                "get": _op("A function's replicas.", params=(_APP, _NAME))
            },
            "/healthz": {"get": {"summary": "Liveness (no key needed).", "security": [],
                                 "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"summary": "Readiness (no key needed).", "security": [],
                                "responses": {"200": {"description": "Ready."}}}},
            "/metrics": {"get": _op("Prometheus metrics.")},
            "/openapi.json": {"get": {"summary": "This document.", "security": [],
                                      "responses": {"200": {"description": "OpenAPI 3.1."}}}},
        },
    }  # fmt: skip
