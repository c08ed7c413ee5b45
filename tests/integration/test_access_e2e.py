"""Customers and keys on the real stack (issue 7): customer A cannot list, call, scale or read
anything of customer B; function-scoped keys call one function only; a revoked key and a
disabled customer are refused by a second router within two seconds; malformed keys are
refused without a lookup and counted; no full key is stored or echoed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from eventually import eventually
from stack import Platform, error_of
from typer.testing import CliRunner, Result

from kiln.apikeys import parse_key
from kiln.cli.main import app as cli
from kiln.db.enums import ApiKeyKind
from kiln.db.models import ApiKey
from kiln.db.session import create_engine
from kiln.devstack.ports import pick_port
from kiln.errors import RemoteError
from kiln.functions.package import package
from kiln.router.app import create_app

pytestmark = pytest.mark.integration

APP = """
import kiln

app = kiln.App("shop")


@app.function()
def price(item: str) -> int:
    return len(item)


@app.function()
def stock(item: str) -> int:
    return 3
"""


def client(platform: Platform, key: str, url: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url or platform.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


async def make_customer(platform: Platform, name: str, tier: str = "enterprise") -> tuple[str, str]:
    """A customer and an account key of theirs."""
    async with platform.client() as operator:
        created = await operator.post("/v1/customers", json={"name": name, "tier": tier})
        assert created.status_code == 201, created.text
        customer = created.json()
        assert (customer["name"], customer["tier"], customer["status"]) == (name, tier, "active")
        key = await operator.post(
            "/v1/keys", json={"kind": "account", "customer_id": customer["id"], "name": "main"}
        )
        # Prepaid tiers call nothing before money comes in (pro's $500 fee, and some).
        paid = await operator.post(
            "/v1/billing/credits", json={"customer_id": customer["id"], "amount_micros": 10**9}
        )
        assert paid.status_code == 201, paid.text
    assert key.status_code == 201, key.text
    return customer["id"], key.json()["key"]


@contextlib.asynccontextmanager
async def second_router(platform: Platform) -> AsyncIterator[str]:
    """Another router process's worth: its own app, NATS connection, caches and port."""
    settings = platform.settings.replace(port=pick_port([], set()))
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                       log_level="warning", lifespan="on")
    )  # fmt: skip
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), within_s=30)
    assert not task.done()
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def test_customers_see_and_touch_only_their_own(platform: Platform, tmp_path: Path) -> None:
    a_id, a_key = await make_customer(platform, "Acme")
    _, b_key = await make_customer(platform, "Bolt", tier="pro")
    app_file = tmp_path / "shop.py"
    app_file.write_text(APP)
    for key in (a_key, b_key):  # the same app name, once per customer
        async with client(platform, key) as c:
            deployed = await c.post("/v1/apps", json=package(app_file).deploy_body())
            assert deployed.status_code == 201, deployed.text
    async with client(platform, a_key) as a, client(platform, b_key) as b:
        assert (await a.post("/v1/run/shop/price", json={"item": "abc"})).json() == 3
        job = (await b.post("/v1/spawn/shop/price", json={"item": "b"})).json()["call_id"]
        b_keys = (await b.get("/v1/keys")).json()["keys"]
        # B's things, seen from A: nothing, and 404 rather than 403.
        assert [k["customer_id"] for k in (await a.get("/v1/keys")).json()["keys"]] == [a_id]
        for method, path, body in [
            ("GET", f"/v1/calls/{job}", None),
            ("POST", f"/v1/calls/{job}/cancel", None),
            ("DELETE", f"/v1/keys/{b_keys[0]['id']}", None),
            ("POST", f"/v1/keys/{b_keys[0]['id']}/rotate", None),
        ]:
            response = await a.request(method, path, json=body)
            assert response.status_code == 404, (path, response.text)
        # A's own shop is A's: scaling it leaves B's alone.
        assert (await a.patch("/v1/functions/shop/price", json={"max_replicas": 2})).is_success
        assert (await b.get("/v1/functions/shop/price")).json()["max_replicas"] == 4
        assert [x["name"] for x in (await a.get("/v1/apps")).json()["apps"]] == ["shop"]
        # Customers are the operator's business.
        refused = await a.get("/v1/customers")
        assert refused.status_code == 403
        assert error_of(refused)["message"] == "managing customers needs an operator key"
        made = await a.post("/v1/keys", json={"kind": "operator"})
        assert made.status_code == 403


async def test_a_function_scoped_key_calls_its_function_only(
    platform: Platform, tmp_path: Path
) -> None:
    _, a_key = await make_customer(platform, "Cato")
    app_file = tmp_path / "shop.py"
    app_file.write_text(APP)
    async with client(platform, a_key) as a:
        assert (await a.post("/v1/apps", json=package(app_file).deploy_body())).is_success
        made = await a.post("/v1/keys", json={"kind": "function", "function": "shop/price"})
        assert made.status_code == 201, made.text
        assert made.json()["function"] == "shop/price"
        missing = await a.post("/v1/keys", json={"kind": "function", "function": "shop/nope"})
        assert missing.status_code == 404
    async with client(platform, made.json()["key"]) as f:
        assert (await f.post("/v1/run/shop/price", json={"item": "ab"})).json() == 2
        other = await f.post("/v1/run/shop/stock", json={"item": "ab"})
        assert other.status_code == 403
        assert error_of(other)["message"] == (
            "this key may only call its own function, not shop/stock"
        )
        assert (await f.get("/v1/apps")).status_code == 403
        assert (await f.get("/v1/keys")).status_code == 403


async def test_revocation_and_disabling_reach_another_router_within_two_seconds(
    platform: Platform,
) -> None:
    customer_id, key = await make_customer(platform, "Dune")
    async with second_router(platform) as url:
        async with client(platform, key, url) as there, client(platform, key) as here:
            # Both routers have the key's verdict cached now.
            assert (await there.get("/v1/apps")).status_code == 200
            assert (await here.get("/v1/apps")).status_code == 200
            listed = (await here.get("/v1/keys")).json()["keys"]
            revoked = await here.delete(f"/v1/keys/{listed[0]['id']}")
            assert revoked.status_code == 204
            assert await _refused_within(there) == 401
            assert (await here.get("/v1/apps")).status_code == 401

        # Disabling a customer reaches the other router too, for every key of theirs.
        async with platform.client() as operator:
            fresh = await operator.post(
                "/v1/keys", json={"kind": "account", "customer_id": customer_id}
            )
            async with client(platform, fresh.json()["key"], url) as there:
                assert (await there.get("/v1/apps")).status_code == 200
                patched = await operator.patch(
                    f"/v1/customers/{customer_id}", json={"status": "disabled"}
                )
                assert patched.json()["status"] == "disabled"
                assert await _refused_within(there) == 403
                body = (await there.get("/v1/apps")).json()
                assert body["error"]["message"] == (
                    "this account is disabled; ask the platform's operator"
                )


async def test_malformed_keys_are_counted_and_no_full_key_is_kept_or_echoed(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    customer_id, key = await make_customer(platform, "Eden")
    async with platform.client() as operator:
        before = _metric((await operator.get("/metrics")).text, "malformed")
        bad = key[:-1] + ("A" if key[-1] != "A" else "B")  # the checksum no longer matches
        async with client(platform, bad) as c:
            refused = await c.get("/v1/apps")
        after = _metric((await operator.get("/metrics")).text, "malformed")
        keys = await operator.get("/v1/keys", params={"customer_id": customer_id})
        rotated = await operator.post(f"/v1/keys/{keys.json()['keys'][0]['id']}/rotate")
    assert refused.status_code == 401
    assert error_of(refused)["message"] == "malformed API key: check that it was copied whole"
    assert bad not in refused.text
    assert after == before + 1
    new_key = rotated.json()["key"]
    assert rotated.json()["prefix"] == new_key[: len(rotated.json()["prefix"])]
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.select(ApiKey.__table__))).all()
    finally:
        await engine.dispose()
    dump = repr(stored)
    for plaintext in (key, new_key):
        assert plaintext not in dump
        assert plaintext.split("_")[2] not in dump  # not even the secret part
        assert plaintext not in caplog.text


async def _refused_within(c: httpx.AsyncClient) -> int:
    """The status of the first refusal within 2 s (a change reaches every router that fast)."""

    async def refused() -> int:
        status = (await c.get("/v1/apps")).status_code
        return status if status != 200 else 0

    return await eventually(refused, within_s=2.0)


def _metric(text: str, reason: str) -> float:
    prefix = f'kiln_router_auth_rejections_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


async def test_the_cli_manages_customers_and_keys(platform: Platform, tmp_path: Path) -> None:
    env = {"KILN_URL": platform.url, "KILN_API_KEY": platform.key, "KILN_HOME": str(tmp_path)}

    def kiln(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), env=env)

    created = await asyncio.to_thread(kiln, "customers", "create", "Fjord", "--tier", "pro")
    assert created.exit_code == 0, created.output
    customer_id, name, plan, tier, status = created.output.split()[:5]
    assert (name, plan, tier, status) == ("Fjord", "pro", "pro", "active")
    moved = await asyncio.to_thread(kiln, "customers", "set-tier", customer_id, "enterprise")
    assert moved.output.split()[2:4] == ["enterprise", "enterprise"]
    planned = await asyncio.to_thread(kiln, "customers", "set-plan", customer_id, "free")
    assert planned.output.split()[2:4] == ["free", "free"]
    made = await asyncio.to_thread(kiln, "keys", "create", "--customer", customer_id)
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    assert parse_key(key) is ApiKeyKind.ACCOUNT
    listed = await asyncio.to_thread(kiln, "keys", "list", "--customer", customer_id)
    assert key not in listed.output
    key_id = listed.output.split()[0]
    assert key[:12] in listed.output  # its prefix, to recognise it by
    async with client(platform, key) as c:
        assert (await c.get("/v1/apps")).status_code == 200
    revoked = await asyncio.to_thread(kiln, "keys", "revoke", key_id)
    assert revoked.output == f"revoked {key_id}\n"
    async with client(platform, key) as c:
        assert (await c.get("/v1/apps")).status_code == 401
    bad = await asyncio.to_thread(kiln, "customers", "set-tier", customer_id, "gold")
    assert isinstance(bad.exception, RemoteError)
    assert "tier='gold' is not valid: expected one of free, pro, enterprise" in str(bad.exception)
    unknown = await asyncio.to_thread(kiln, "customers", "set-plan", customer_id, "gold")
    assert isinstance(unknown.exception, RemoteError)
    assert "plan 'gold' not found; the plans are" in str(unknown.exception)


async def test_a_tier_caps_the_replicas_of_each_function(
    platform: Platform, tmp_path: Path
) -> None:
    _, key = await make_customer(platform, "Gale", tier="free")
    app_file = tmp_path / "shop.py"
    app_file.write_text(APP)
    async with client(platform, key) as c:
        # The default max_replicas (4) is lowered to the free tier's 1 ...
        assert (await c.post("/v1/apps", json=package(app_file).deploy_body())).is_success
        assert (await c.get("/v1/functions/shop/price")).json()["max_replicas"] == 1
        # ... one the developer wrote is refused, and so is a live change above it.
        app_file.write_text(APP.replace("@app.function()\ndef price", "@app.function("
                                        "max_replicas=3)\ndef price"))  # fmt: skip
        refused = await c.post("/v1/apps", json=package(app_file).deploy_body())
        assert refused.status_code == 400
        assert error_of(refused)["message"] == (
            "max_replicas=3 is not valid for function 'price': the free tier allows at most 1 "
            "replica per function"
        )
        patched = await c.patch("/v1/functions/shop/price", json={"max_replicas": 2})
        assert error_of(patched)["message"] == (
            "max_replicas=2 is not valid: the free tier allows at most 1 replica per function"
        )


async def test_operators_see_which_customers_are_refused_most(platform: Platform) -> None:
    customer_id, key = await make_customer(platform, "Hail", tier="free")
    async with platform.client() as operator:
        await operator.patch(f"/v1/customers/{customer_id}", json={"limits": {"burst": 2}})
    async with client(platform, key) as c:
        statuses = [(await c.get("/v1/calls/nothing")).status_code for _ in range(6)]
    assert statuses.count(429) >= 3, statuses
    async with platform.client() as operator:
        listed = await operator.get("/v1/keys", params={"customer_id": customer_id})
        await operator.delete(f"/v1/keys/{listed.json()['keys'][0]['id']}")
    async with client(platform, key) as c:
        for _ in range(4):  # a revoked key, still being tried
            assert (await c.get("/v1/apps")).status_code == 401
    async with platform.client() as operator:

        async def counted() -> list[dict[str, Any]]:
            report = (await operator.get("/v1/abuse", params={"window": 600})).json()
            mine = [r for r in report["customers"] if r["customer_id"] == customer_id]
            assert mine, report
            assert mine[0]["refused"] >= 4, report
            return mine

        mine = await eventually(counted, within_s=5)
        metrics = (await operator.get("/metrics")).text
    async with client(platform, key) as c:
        refused = await c.get("/v1/abuse")
    assert mine[0]["rate_limited"] >= 3
    assert mine[0]["total"] == mine[0]["refused"] + mine[0]["rate_limited"] + mine[0]["errors"]
    assert 'kiln_router_customer_rejections_total{kind="rate_limited",tier="free"}' in metrics
    assert refused.status_code == 401
