"""Typed request bodies and query strings: one declaration (a pydantic model, in
`kiln.router.bodies`) validates what comes in and generates the JSON Schemas of `/openapi.json`.

Pydantic's own words ("Input should be a valid integer") never reach a caller. A field says what
it allows with `Expect`, and its refusal reads `NAME=VALUE is not valid: expected ALLOWED`
(style habit 4), or a message of its own; a model words the refusals that concern the whole body
(not an object, unknown or missing fields). Every refusal is a `KilnError`, so the one mapping in
`kiln.router.errors` answers it. A validator that needs more words raises a `KilnError` itself:
pydantic lets exceptions other than ValueError and AssertionError through unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import Request

from kiln.errors import InvalidJson, InvalidRequest, KilnError, PayloadTooLarge

__all__ = [
    "Body",
    "Expect",
    "Patch",
    "Query",
    "View",
    "parse_json",
    "path_text",
    "read_body",
    "read_model",
    "read_query",
    "storable_text",
    "validated",
]

_M = TypeVar("_M", bound="Body")
_Q = TypeVar("_Q", bound="Query")
_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Expect:
    """What a field allows, as its refusal says it: `allowed` completes
    `NAME=VALUE is not valid: expected ...`; `message` (with `{name}` and `{value!r}`) replaces
    the whole sentence; `error` is the class raised (a malformed customer id is a customer not
    found, say); `beyond` words the refusal of a value past a bound that only storage sets
    (`NAME=VALUE is not valid: expected ...`, by pydantic's error type)."""

    allowed: str = ""
    message: str | None = None
    error: type[KilnError] = InvalidRequest
    beyond: tuple[tuple[str, str], ...] = ()

    def refusal(self, name: str, value: object, kind: str = "") -> KilnError:
        for error_type, allowed in self.beyond:
            if error_type == kind:
                return self.error(f"{name}={value!r} is not valid: expected {allowed}")
        if self.message is not None:
            return self.error(self.message.format(name=name, value=value))
        return self.error(f"{name}={value!r} is not valid: expected {self.allowed}")


class Body(BaseModel):
    """A JSON request body. Subclasses set the messages of the refusals about the whole body;
    `{unknown}` and `{missing}` list the fields (comma-separated, `{first!r}` the first unknown
    one), `{known}` the fields a caller may send, less `unlisted`."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=False)

    not_object: ClassVar[str] = "send a JSON object"
    empty: ClassVar[str | None] = None  # an empty object is refused with this, when set
    unknown: ClassVar[str] = "unknown field {first!r}; fields are {known}"
    missing: ClassVar[str | None] = None  # else each missing field's own refusal (as null)
    unlisted: ClassVar[frozenset[str]] = frozenset()
    error: ClassVar[type[KilnError]] = InvalidRequest  # of the body-wide refusals

    @classmethod
    def known(cls) -> list[str]:
        return [name for name in cls.model_fields if name not in cls.unlisted]


def _patch_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)  # absent means unchanged, not a default
    if getattr(model, "empty", None) is not None:
        schema["minProperties"] = 1


class Patch(Body):
    """A PATCH body: unknown fields are refused, and a field sent is a change (its Python
    default only fills the ones not sent: see `model_fields_set`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_patch_schema)


class Query(Body):
    """A query string, validated from its text (`limit=5` is the integer 5)."""


class View(BaseModel):
    """A response body: only generates its schema and serialises (`kiln.router.views.dump`).
    A key no field declares is a bug in the handler, refused loudly."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def validated(model: type[_M], data: Any) -> _M:
    """`data` (decoded JSON) as a `model`, or the `KilnError` that says what is wrong."""
    if not isinstance(data, dict):
        raise model.error(model.not_object)
    if not data and model.empty is not None:
        raise model.error(model.empty)
    for key, value in data.items():
        if not _storable(value):
            raise InvalidRequest(f"{key}={value!r} is not valid: {_UNSTORABLE}")
    if not issubclass(model, Query):
        data = {key: _integral(value) for key, value in data.items()}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise refusal(model, exc.errors(include_url=False)) from None


_UNSTORABLE = "expected text without NUL characters or unpaired surrogates"


def storable_text(text: str) -> bool:
    """Whether PostgreSQL can store `text` (and compare with it): no NUL, valid UTF-8."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escapes can make
        return False
    return True


def _storable(value: Any) -> bool:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    return True


def path_text(request: Request, name: str) -> str:
    """The path parameter `name`, refused when PostgreSQL could not compare with it."""
    value: str = request.path_params[name]
    if not storable_text(value):
        raise InvalidRequest(f"{name}={value!r} is not valid: {_UNSTORABLE}")
    return value


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer, so a body's integers may come as such floats (the
    fields are strict otherwise: true is not 1, "5" is not 5)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def refusal(model: type[Body], errors: list[ErrorDetails]) -> KilnError:
    """The one error that tells the caller what to fix first."""
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        text = model.unknown.format(
            unknown=", ".join(unknown), first=unknown[0], known=", ".join(model.known())
        )
        return model.error(text)
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    if missing and model.missing is not None:
        return model.error(model.missing.format(missing=", ".join(missing)))
    first = errors[0]
    if not first["loc"]:
        return model.error(model.not_object)
    name = str(first["loc"][0])
    value = None if first["type"] == "missing" else first["input"]
    field = model.model_fields.get(name)
    expect = next((m for m in (field.metadata if field else ()) if isinstance(m, Expect)), None)
    if expect is None:  # every field has its words (tests/unit/test_bodies.py); just in case
        return model.error(f"{name}={value!r} is not valid: {first['msg']}")
    return expect.refusal(name, value, first["type"])


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_model(request: Request, model: type[_M], *, limit: int = _BODY_LIMIT) -> _M:
    """The request's JSON body (an empty body is `{}`) as a `model`."""
    raw = await read_body(request, limit)
    return validated(model, parse_json(raw))


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"{}")
    except ValueError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None


def read_query(request: Request, model: type[_Q]) -> _Q:
    """The request's query parameters as a `model` (the last value of a repeated one)."""
    return validated(model, dict(request.query_params))
