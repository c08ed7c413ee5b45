"""Router pieces with no services behind them: body classification, deploy checks and node slot
accounting."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from typing import Any

import pytest
from starlette.routing import Route

import kiln
from kiln.errors import InvalidJson, InvalidSpec
from kiln.functions.gpu import gpu_request
from kiln.invoker.agent import _Slots
from kiln.router.app import ROUTES
from kiln.router.deploy import Deployer, DeployRequest
from kiln.router.openapi import openapi_document
from kiln.router.run import classify


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"", "", (b"{}", "application/json")),
        (b'{"a": 1}', "application/json", (b'{"a": 1}', "application/json")),
        (b'{"a": 1}', "application/x-www-form-urlencoded", (b'{"a": 1}', "application/json")),
        (b"not json", "text/plain", (b"not json", "application/octet-stream")),
        (b"\x00\x01", "application/octet-stream", (b"\x00\x01", "application/octet-stream")),
        (b"[1, 2]", "application/vnd.kiln+json", (b"[1, 2]", "application/json")),
    ],
)
def test_classify(body: bytes, content_type: str, expected: tuple[bytes, str]) -> None:
    assert classify(body, content_type) == expected


def test_declared_json_must_parse() -> None:
    with pytest.raises(InvalidJson, match=r"^the body is not valid JSON: "):
        classify(b"{oops", "application/json; charset=utf-8")


def test_slots_are_taken_and_returned() -> None:
    slots = _Slots({"A10G": 2, "none": 1})
    assert slots.take("A10G:2") == ("A10G", [0, 1])
    assert slots.take("A10G") is None
    assert slots.take("any") is None  # no GPU left; CPU slots never count as "any"
    assert slots.take("none") == ("none", [0])
    slots.give_back("A10G", [1, 0])
    assert slots.take("any") == ("A10G", [0])


def test_gpu_requests() -> None:
    assert gpu_request("h100:2") == ("H100", 2)
    assert gpu_request("none") == ("none", 1)


def test_a_gpu_host_offers_cpu_slots_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.invoker import inventory
    from kiln.settings import Settings

    monkeypatch.setattr(inventory, "_nvml_inventory", lambda: {"H100": 8})
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    slots = inventory.node_slots(Settings.from_env({"HOME": "/h"}))
    assert slots == {"H100": 8, "none": 64}
    simulated = Settings.from_env({"HOME": "/h", "KILN_NODE_GPUS": "A10G:2"})
    assert inventory.node_slots(simulated) == {"A10G": 2}


def _deploy_body(**options: Any) -> dict[str, Any]:
    app = kiln.App("capped")

    @app.function(**options)
    def work() -> str:
        return "done"

    archive = b"source"
    return {
        "app": "capped",
        "digest": hashlib.sha256(archive).hexdigest(),
        "entrypoint": "app.py",
        "functions": [spec.to_dict() for spec in app.spec()],
        "archive": base64.b64encode(archive).decode(),
    }


async def test_a_deploy_above_the_platforms_replica_cap_is_refused_before_storing_anything() -> (
    None
):
    # No code store, database or NATS behind it: the refusal must come first.
    deployer = Deployer(None, None, None, None, max_replicas=2)  # type: ignore[arg-type]
    request = DeployRequest.from_json(_deploy_body(max_replicas=3))
    with pytest.raises(InvalidSpec) as caught:
        await deployer.deploy(uuid.uuid4(), request)
    assert str(caught.value) == (
        "max_replicas=3 is not valid for function 'work': this platform allows at most 2 "
        "replicas per function"
    )


def test_a_deploy_keeps_which_settings_the_developer_wrote() -> None:
    request = DeployRequest.from_json(_deploy_body(max_replicas=3, scaledown_window=9))
    assert request.functions[0].resources.explicit == ("idle_timeout_s", "max_replicas")
    assert request.reset_scaling is False
    body = _deploy_body()
    body["functions"][0]["resources"]["explicit"] = ["colour"]
    with pytest.raises(InvalidSpec, match=r"^explicit names unknown settings \['colour'\]"):
        DeployRequest.from_json(body)


def test_the_openapi_document_describes_every_http_route() -> None:
    paths = openapi_document()["paths"]
    for route in ROUTES:
        if isinstance(route, Route):
            path = re.sub(r":\w+}", "}", route.path)  # {model:path} is OpenAPI's {model}
            assert path in paths, route.path
            assert set(paths[path]) >= {m.lower() for m in route.methods or ()} - {"head"}


def test_what_counts_as_postgresql_being_away() -> None:
    import asyncpg
    import nats.errors
    from sqlalchemy import exc as sa_exc

    from kiln.db.session import database_unreachable

    starting = asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
    assert database_unreachable(sa_exc.DBAPIError("SELECT 1", {}, starting))
    assert database_unreachable(ConnectionRefusedError(111, "Connect call failed"))
    assert database_unreachable(sa_exc.OperationalError("SELECT 1", {}, Exception("gone")))
    # A query PostgreSQL refused is a bug, and a NATS timeout is not PostgreSQL's.
    unique = asyncpg.exceptions.UniqueViolationError("duplicate key")
    assert not database_unreachable(sa_exc.IntegrityError("INSERT", {}, unique))
    assert not database_unreachable(nats.errors.TimeoutError())
    assert not database_unreachable(ValueError("bad"))
