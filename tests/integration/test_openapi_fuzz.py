"""schemathesis against `/openapi.json` of a running platform (as `kiln dev` runs it, with an
operator key and Stripe played by tests/integration/fakestripe.py): requests generated from the
document, valid and invalid, never get a 5xx; what the platform answers matches the document;
and every operation with a typed body gets past validation at least once.

Bounded: a few examples per operation and mode, derandomised, so a failure reproduces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from fakestripe import API_KEY, WEBHOOK_SECRET, fake_stripe
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance
from stack import Platform, running_platform

from kiln.functions.package import package
from kiln.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EXAMPLES = 20  # per operation and generation mode
# Answers that do not show a request got past its body's validation: auth comes first.
NOT_PAST_VALIDATION = {400, 401, 403, 422}

APP = """
import kiln

app = kiln.App("fuzzed")


@app.function()
def echo(text: str) -> str:
    return text
"""


@pytest.fixture(scope="module")
async def platform(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    async with fake_stripe() as stripe:
        paying = settings.replace(
            stripe_api_key=API_KEY, stripe_api_base=stripe.url, stripe_webhook_secret=WEBHOOK_SECRET
        )
        home = tmp_path_factory.mktemp("fuzz-home")
        async with running_platform(paying, home, stop_apps=True) as running:
            yield running


@dataclass
class Outcome:
    statuses: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    failures: list[str] = field(default_factory=list)


def _examples(strategy: Any, test: Any) -> None:
    """`test` on `EXAMPLES` cases drawn from `strategy`."""

    @hypothesis.given(case=strategy)
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case[Any]) -> None:
        test(case)

    run()


def _fuzz(
    schema: Any,
    url: str,
    key: str,
    *,
    pinned: dict[str, dict[str, Any]],
    seeds: dict[str, Any],
) -> Outcome:
    """Runs in a thread: the platform answers on the test's event loop meanwhile."""
    headers = {"Authorization": f"Bearer {key}"}
    outcome = Outcome()

    def check(name: str, case: schemathesis.Case[Any]) -> None:
        response = case.call(base_url=url, headers=headers, timeout=30)
        outcome.statuses[name].add(response.status_code)
        try:
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance]
            )
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not the first
            outcome.failures.append(f"{name}: {response.status_code} {response.text[:300]}\n{exc}")

    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is sound
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        runs = [
            operation.as_strategy(mode, path_parameters=pinned.get(operation.path))
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
        if name in seeds:
            runs.append(operation.as_strategy(body=seeds[name]))
        for strategy in runs:
            # Unsatisfiable: nothing in this operation can be made invalid.
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                _examples(strategy, lambda case, name=name: check(name, case))
    return outcome


async def test_the_api_fuzzed_from_its_openapi_document(platform: Platform, tmp_path: Path) -> None:
    app_file = tmp_path / "fuzzed.py"
    app_file.write_text(APP)
    await platform.deploy(app_file)
    async with platform.client() as client:
        document = (await client.get("/openapi.json")).json()
        customer = await client.post("/v1/customers", json={"name": "fuzzed", "tier": "pro"})
        assert customer.status_code == 201, customer.text
        plan = await client.post("/v1/plans", json={"name": "fuzzed"})
        assert plan.status_code == 201, plan.text
    # Random data cannot make an archive match its digest: one real deploy body goes in too.
    seeds = {
        "POST /v1/apps": package(app_file).deploy_body(),
        # A pod's body is one of three shapes, each with rules of its own: one that passes them
        # (a shell of a function that is not there: 404).
        "POST /v1/pods": {"shell": "fuzzed/nothing"},
    }
    # A real customer and plan, so that a change to them is validated (an unknown one is 404
    # before).
    # The deployed function's calls and replicas, so their queries reach the database (not its
    # settings: a fuzzed min_replicas would start replicas).
    function = {"app": "fuzzed", "name": "echo"}
    pinned = {
        "/v1/customers/{customer_id}": {"customer_id": customer.json()["id"]},
        "/v1/plans/{name}": {"name": "fuzzed"},
        "/v1/functions/{app}/{name}/calls": function,
        "/v1/functions/{app}/{name}/replicas": function,
    }
    # Loaded here, not in the thread: it imports schemathesis' OpenAPI modules, and pytest's
    # assertion rewriting of them in a thread can trip CPython 3.11's "AST constructor
    # recursion depth mismatch" (seen once in a full run).
    schema = schemathesis.openapi.from_dict(document)
    outcome = await asyncio.to_thread(
        _fuzz, schema, platform.url, platform.key, pinned=pinned, seeds=seeds
    )
    assert not outcome.failures, "\n\n".join(outcome.failures)
    with_body = [
        f"{method.upper()} {path}"
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
        if "$ref" in str(operation.get("requestBody", ""))
    ]
    assert len(with_body) == 14, with_body
    stuck = {
        name: sorted(outcome.statuses[name])
        for name in with_body
        if not outcome.statuses[name] - NOT_PAST_VALIDATION
    }
    assert not stuck, f"never got past validation: {stuck}"
