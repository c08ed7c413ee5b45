"""The typed bodies and query strings of the API (kiln.router.bodies): each refusal is a
KilnError in Kiln's words (the parameter, its value, what is allowed), and the OpenAPI document
is generated from the same models."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from kiln.errors import InvalidRequest, InvalidSpec, KilnError, NotFound
from kiln.router import bodies
from kiln.router.openapi import openapi_document
from kiln.router.validation import Body, Expect, validated


def refusal(model: type[Body], data: Any) -> KilnError:
    with pytest.raises(KilnError) as caught:
        validated(model, data)
    return caught.value


CASES: list[tuple[type[Body], Any, type[KilnError], str]] = [
    (bodies.CustomerBody, {}, InvalidRequest,
     "name=None is not valid: expected 1 to 200 characters"),
    (bodies.CustomerBody, {"name": "   "}, InvalidRequest,
     "name='   ' is not valid: expected 1 to 200 characters"),
    (bodies.CustomerBody, {"name": "a", "tier": "gold"}, InvalidRequest,
     "tier='gold' is not valid: expected one of free, pro, enterprise"),
    (bodies.CustomerBody, [1], InvalidRequest, "send a JSON object"),
    # What PostgreSQL cannot store is refused before it gets there (a 500 the fuzzer found).
    (bodies.CustomerBody, {"name": "a\x00b"}, InvalidRequest,
     "name='a\\x00b' is not valid: expected text without NUL characters or unpaired surrogates"),
    (bodies.CreditBody, {"description": ["\ud800"]}, InvalidRequest,
     "description=['\\ud800'] is not valid: expected text without NUL characters or unpaired "
     "surrogates"),
    (bodies.CustomerPatch, {}, InvalidRequest,
     "cannot change nothing; changeable: plan, tier, status, name, limits"),
    (bodies.CustomerPatch, {"colour": 1, "age": 2}, InvalidRequest,
     "cannot change age, colour; changeable: plan, tier, status, name, limits"),
    (bodies.CustomerPatch, {"status": "gone"}, InvalidRequest,
     "status='gone' is not valid: expected active or disabled"),
    (bodies.KeyBody, {"kind": "root"}, InvalidRequest,
     "kind='root' is not valid: expected account, function or operator"),
    (bodies.KeyBody, {"name": "x" * 101}, InvalidRequest,
     f"name={'x' * 101!r} is not valid: expected at most 100 characters"),
    (bodies.KeyBody, {"expires_in_s": True}, InvalidRequest,
     "expires_in_s=True is not valid: expected whole seconds from 60 to ten years"),
    (bodies.KeyBody, {"customer_id": "nobody"}, NotFound, "customer 'nobody' not found"),
    (bodies.FunctionPatch, [], InvalidRequest,
     "send a JSON object with any of: min_replicas, max_replicas, buffer_replicas, "
     "idle_timeout, concurrency, target_concurrency, timeout, startup_timeout"),
    (bodies.FunctionPatch, {}, InvalidRequest,
     "send a JSON object with any of: min_replicas, max_replicas, buffer_replicas, "
     "idle_timeout, concurrency, target_concurrency, timeout, startup_timeout"),
    (bodies.FunctionPatch, {"gpu": "H100"}, InvalidRequest,
     "cannot change gpu; changeable: min_replicas, max_replicas, buffer_replicas, "
     "idle_timeout, concurrency, target_concurrency, timeout, startup_timeout"),
    (bodies.FunctionPatch, {"min_replicas": -1}, InvalidRequest,
     "min_replicas=-1 is not valid: expected an integer >= 0"),
    (bodies.FunctionPatch, {"timeout": None}, InvalidRequest,
     "timeout=None is not valid: expected an integer >= 0"),
    (bodies.FunctionPatch, {"concurrency": 1.5}, InvalidRequest,
     "concurrency=1.5 is not valid: expected an integer >= 0"),
    (bodies.FunctionPatch, {"max_replicas": 2**31}, InvalidRequest,
     "max_replicas=2147483648 is not valid: expected an integer from 0 to 2147483647"),
    (bodies.DeployBody, {"app": "x"}, InvalidRequest,
     "the deploy body lacks digest, entrypoint, functions, archive"),
    (bodies.DeployBody, "app", InvalidRequest,
     "a deploy body is a JSON object; use `kiln deploy FILE`"),
    (bodies.SettingsPatch, {"payment_method_id": "pm_1"}, InvalidRequest,
     "unknown setting 'payment_method_id'; settings are refill_amount_micros, "
     "refill_threshold_micros, reset_refill_failures, spend_cap_micros"),
    (bodies.OperatorSettingsPatch, {"colour": 1}, InvalidRequest,
     "unknown setting 'colour'; settings are payment_method_id, refill_amount_micros, "
     "refill_threshold_micros, reset_refill_failures, spend_cap_micros"),
    (bodies.OperatorSettingsPatch, {"payment_method_id": "card"}, InvalidRequest,
     "payment_method_id='card' is not valid: expected pm_..."),
    (bodies.SettingsPatch, {"refill_threshold_micros": 5}, InvalidRequest,
     "refill_threshold_micros and refill_amount_micros go together: give both "
     "(auto-refill on) or both null (off)"),
    (bodies.SettingsPatch, {"spend_cap_micros": -1}, InvalidRequest,
     "spend_cap_micros=-1 is not valid: expected whole micro-units from 0 to "
     "4611686018427387904 or null"),
    (bodies.CreditBody, {"amount_micros": 0}, InvalidRequest,
     "amount_micros=0 is not valid: expected a non-zero amount"),
    (bodies.CreditBody, {}, InvalidRequest,
     "amount_micros=None is not valid: expected whole micro-units from -4611686018427387904 "
     "to 4611686018427387904"),
    (bodies.TopupBody, {"amount_micros": 10**7, "success_url": "https://a"}, InvalidRequest,
     "cancel_url=None is not valid: Checkout needs an http(s) URL"),
    (bodies.TopupBody, {"amount_micros": 10**7, "method": "cash"}, InvalidRequest,
     "method='cash' is not valid: expected checkout or payment_intent"),
    (bodies.LogsQuery, {"follow": "maybe"}, InvalidRequest,
     "follow='maybe' is not valid: expected true or false"),
    (bodies.CallsQuery, {"status": "lost"}, InvalidRequest,
     "status='lost' is not valid: expected one of succeeded, failed, cancelled"),
    (bodies.CallsQuery, {"limit": "0"}, InvalidRequest,
     "limit='0' is not valid: expected a whole number 1 to 1000"),
    (bodies.CallsQuery, {"since": "yesterday"}, InvalidRequest,
     "since='yesterday' is not valid: expected an ISO date or time such as 2026-11-01 or "
     "2026-11-01T12:00:00Z or a span back from now such as 10m, 2h or 7d"),
    (bodies.AbuseQuery, {"window": "5"}, InvalidRequest,
     "window='5' is not valid: expected seconds from 60 to 7200"),
    (bodies.TransactionsQuery, {"limit": "many"}, InvalidRequest,
     "limit and before must be integers"),
    (bodies.UsageQuery, {"group_by": "colour"}, InvalidRequest,
     "group_by='colour' is not valid: expected function, gpu_type, both or none"),
    (bodies.UsageQuery, {"granularity": "week"}, InvalidRequest,
     "granularity='week' is not valid: expected hour or day"),
    (bodies.RevenueQuery, {"format": "xml"}, InvalidRequest,
     "format='xml' is not valid: expected json or csv"),
    (bodies.SpawnQuery, {"webhook": "ftp://example.com"}, InvalidRequest,
     "webhook='ftp://example.com' is not valid: expected an http:// or https:// URL of at "
     "most 2048 characters"),
    (bodies.PodBody, {"environment": {"app": "a"}, "auto_stop_hours": 0}, InvalidRequest,
     "auto_stop_hours=0 is not valid: expected a number of hours above 0 and at most 8760, "
     "such as 2 or 0.5"),
    (bodies.PodBody, {"environment": {"app": "a"}, "auto_stop_hours": "2"}, InvalidRequest,
     "auto_stop_hours='2' is not valid: expected a number of hours above 0 and at most 8760, "
     "such as 2 or 0.5"),
    (bodies.PodBody, {"shell": "a/b", "auto_stop_hours": 1}, InvalidRequest,
     "auto_stop_hours is for pods: a shell ends with its terminal"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "data", "error", "message"), CASES)
def test_a_refusal_names_the_field_its_value_and_what_is_allowed(
    model: type[Body], data: Any, error: type[KilnError], message: str
) -> None:
    refused = refusal(model, data)
    assert type(refused) is error
    assert refused.message == message


def test_a_deploy_with_a_bad_app_name_is_a_bad_spec() -> None:
    body = {"app": "Bad_Name", "digest": "0" * 64, "entrypoint": "a.py", "functions": [{}],
            "archive": ""}  # fmt: skip
    refused = refusal(bodies.DeployBody, body)
    assert isinstance(refused, InvalidSpec)
    assert refused.message.startswith("app name 'Bad_Name' is not valid: use 1 to 63")


def test_what_a_body_accepts() -> None:
    customer = validated(bodies.CustomerBody, {"name": "  Ada  "})
    assert (customer.name, customer.tier.value) == ("Ada", "free")
    patch = validated(bodies.FunctionPatch, {"min_replicas": 2.0})  # JSON Schema's integer
    assert patch.model_fields_set == {"min_replicas"}
    assert patch.min_replicas == 2
    who = uuid.uuid4()
    assert validated(bodies.KeyBody, {"customer_id": str(who)}).customer_id == who
    logs = validated(bodies.LogsQuery, {"follow": "", "since": "10m"})
    assert logs.follow is False
    assert logs.since is not None
    assert validated(bodies.UsageQuery, {"group_by": "gpu_type, none"}).groups() == ["gpu_type"]
    assert validated(bodies.TransactionsQuery, {"limit": "7"}).limit == 7
    for hours, seconds in ((2, 7200), (0.5, 1800), (0.001, 4), (None, None)):
        pod = validated(bodies.PodBody, {"environment": {"app": "a"}, "auto_stop_hours": hours})
        assert pod.auto_stop_s == seconds  # whole seconds, at least one


def _models() -> list[type[Body]]:
    found = []
    for name in bodies.__all__:
        model = getattr(bodies, name)
        if isinstance(model, type) and issubclass(model, Body):
            found.append(model)
    return found


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_field_says_what_it_allows(model: type[Body]) -> None:
    for name, field in model.model_fields.items():
        assert any(isinstance(m, Expect) for m in field.metadata), f"{model.__name__}.{name}"


def test_the_openapi_document_types_every_body_and_resolves_every_reference() -> None:
    document = openapi_document()
    schemas = document["components"]["schemas"]
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    patch = document["paths"]["/v1/functions/{app}/{name}"]["patch"]
    body = patch["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/FunctionPatch"}
    settings = schemas["FunctionPatch"]
    assert settings["additionalProperties"] is False
    assert settings["minProperties"] == 1
    assert settings["properties"]["min_replicas"] == {
        "maximum": 2**31 - 1, "minimum": 0, "title": "Min Replicas", "type": "integer"
    }  # fmt: skip
    calls = document["paths"]["/v1/functions/{app}/{name}/calls"]["get"]["parameters"]
    limit = next(p for p in calls if p["name"] == "limit")
    assert limit == {
        "name": "limit", "in": "query", "required": False,
        "schema": {"default": 50, "maximum": 1000, "minimum": 1, "type": "integer"},
    }  # fmt: skip
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if method in ("post", "patch") and not path.endswith("/webhook"):
                needs_body = not path.startswith(("/v1/calls", "/v1/keys/{key_id}")) and not (
                    path.startswith("/v1/pods/{pod_id}/")  # stop and start: no body
                )
                assert ("requestBody" in operation) == needs_body, (method, path)
