"""The console's operator pages on the real stack: an operator (as `kiln dev` makes one) signs
in to the customers page, creates a customer, changes its tier, disables it (its keys stop
working at once) and enables it again, and sees the nodes with their replicas and the queues.
A customer's user is refused there."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from eventually import eventually
from stack import Platform
from test_console_accounts import csrf_of, fresh_email, post_form, register

from kiln.db.bootstrap import CONSOLE_OPERATOR, ensure_console_operator

pytestmark = [pytest.mark.integration]

APP = """
import kiln

app = kiln.App("{name}")


@app.function(min_replicas=1, max_replicas=1)
def ping() -> str:
    return "pong"
"""


@pytest.fixture(scope="module")
async def operator_password(platform: Platform) -> str:
    password = await ensure_console_operator(platform.settings)
    assert password is not None  # made now: shown once
    assert await ensure_console_operator(platform.settings) is None  # and only once
    return password


@pytest.fixture
async def operator(platform: Platform, operator_password: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as browser:
        signed_in = await post_form(
            browser, "/console/login", {"email": CONSOLE_OPERATOR, "password": operator_password}
        )
        assert signed_in.status_code == 303
        yield browser


async def test_customers_tiers_and_disabling(
    platform: Platform, operator: httpx.AsyncClient
) -> None:
    home = await operator.get("/console/")
    assert home.status_code == 303
    assert home.headers["location"] == "/console/operator"
    name = f"Acme {secrets.token_hex(3)}"
    made = await post_form(
        operator, "/console/operator", {"action": "create", "name": name, "tier": "pro"}
    )
    assert f"Customer {name} created on the pro tier." in made.text
    assert re.search(r'id="mrr">\$[0-9,]+\.[0-9]{2}<', made.text)  # with pro's $500 in it
    async with platform.client() as api:
        customer = next(
            c for c in (await api.get("/v1/customers")).json()["customers"] if c["name"] == name
        )
        key = (await api.post("/v1/keys", json={"customer_id": customer["id"]})).json()["key"]
    changed = await post_form(
        operator,
        "/console/operator",
        {"action": "tier", "customer": customer["id"], "tier": "enterprise"},
    )
    assert "Tier changed to enterprise." in changed.text
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Authorization": f"Bearer {key}"}
    ) as theirs:
        assert (await theirs.get("/v1/functions")).status_code == 200
        disabled = await post_form(
            operator, "/console/operator", {"action": "disable", "customer": customer["id"]}
        )
        assert "Customer disabled." in disabled.text

        async def refused() -> bool:
            return (await theirs.get("/v1/functions")).status_code in (401, 403)

        await eventually(refused, within_s=10, what="the disabled customer's key refused")
        enabled = await post_form(
            operator, "/console/operator", {"action": "enable", "customer": customer["id"]}
        )
        assert "Customer active." in enabled.text
    async with platform.client() as api:
        now = (await api.get(f"/v1/customers/{customer['id']}")).json()
    assert (now["tier"], now["status"]) == ("enterprise", "active")


async def test_nodes_and_queues(
    platform: Platform, operator: httpx.AsyncClient, tmp_path: Path
) -> None:
    name = f"ping-{secrets.token_hex(3)}"
    await platform.deploy_source(tmp_path, "ping_app.py", APP.format(name=name))
    try:
        await eventually(
            lambda: platform.ready_replicas(f"{name}/ping"), within_s=60, what="a replica"
        )

        async def shown() -> str:
            page = await operator.get("/console/operator/nodes")
            assert f"{name}/ping" in page.text
            return page.text

        text = await eventually(shown, within_s=10, what="the replica on the nodes page")
        assert "<h2>Queues</h2>" in text
        assert "ready" in text
    finally:  # its minimum would keep a replica (and a slot) through the later modules
        async with platform.client() as api:
            await api.delete(f"/v1/apps/{name}")


async def test_customers_users_are_kept_out(platform: Platform) -> None:
    async with httpx.AsyncClient(base_url=platform.url, headers={"Origin": platform.url}) as user:
        await register(platform, user, fresh_email())
        for path in ("/console/operator", "/console/operator/nodes"):
            refused = await user.get(path)
            assert refused.status_code == 403
            assert "for the platform&#39;s operators" in refused.text


async def test_an_operator_views_a_customer_and_acts_for_it(
    platform: Platform, operator: httpx.AsyncClient
) -> None:
    email = fresh_email()
    async with httpx.AsyncClient(base_url=platform.url, headers={"Origin": platform.url}) as owner:
        await register(platform, owner, email)
        await post_form(owner, "/console/keys", {"action": "create", "name": "theirs"})
        assert (await owner.get("/console/billing")).status_code == 200
    async with platform.client() as api:
        listed = (await api.get("/v1/customers")).json()["customers"]
    customer = next(c for c in listed if c["name"] == f"Org {email}")
    viewed = await post_form(
        operator, "/console/operator", {"action": "view", "customer": customer["id"]}
    )
    assert viewed.status_code == 303
    assert viewed.headers["location"] == "/console/"
    home = await operator.get("/console/")
    assert home.status_code == 200
    assert f"Viewing <strong>Org {email}</strong> as an operator" in home.text
    keys = await operator.get("/console/keys")
    assert "theirs" in keys.text  # the customer's keys
    billing = await operator.get("/console/billing")
    assert billing.status_code == 200
    back = await operator.post(
        "/console/operator", data={"csrf": csrf_of(keys), "action": "unview"}
    )
    assert back.status_code == 303
    assert (await operator.get("/console/")).headers["location"] == "/console/operator"
