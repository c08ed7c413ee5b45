"""The console's deployment pages on the real stack: a customer who signed up in the console
deploys with a key made there; the list and the page show the deployment, its calls (requests,
errors, latency from the invocation log), its replicas and its log lines as they come; scaling
set in the form applies; stop removes it. Another customer's deployment is a 404."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from eventually import eventually
from stack import Platform
from test_console_accounts import csrf_of, fresh_email, post_form, register

from kiln.functions.package import package

pytestmark = [pytest.mark.integration]

SOURCE = """
import kiln

app = kiln.App("{app}")


@app.function(min_replicas=0, max_replicas=1, idle_timeout=300)
def echo(text: str) -> str:
    print(f"echoing {{text}}")
    if text == "fail":
        raise ValueError("asked to fail")
    return text
"""


class Customer:
    def __init__(self, browser: httpx.AsyncClient, key: str, app: str) -> None:
        self.browser = browser
        self.key = key
        self.app = app

    def api(self, platform: Platform) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=platform.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )


@pytest.fixture
async def customer(platform: Platform, tmp_path: Path) -> AsyncIterator[Customer]:
    """Signed up in the console, with money, a key made there, and an app deployed with it."""
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as browser:
        await register(platform, browser, fresh_email())
        made = await post_form(browser, "/console/keys", {"action": "create", "name": "deploy"})
        key = re.search(r'<code id="new-key">([^<]+)</code>', made.text)
        assert key is not None
        app = f"echo-{secrets.token_hex(3)}"
        (tmp_path / "echo_app.py").write_text(SOURCE.format(app=app))
        found = Customer(browser, key.group(1), app)
        async with found.api(platform) as api:
            customer_id = (await api.get("/v1/billing/balance")).json()["customer_id"]
            async with platform.client() as operator:
                credited = await operator.post(
                    "/v1/billing/credits",
                    json={"customer_id": customer_id, "amount_micros": 10**8},
                )
                assert credited.status_code == 201, credited.text
            deployed = await api.post(
                "/v1/apps", json=package(tmp_path / "echo_app.py").deploy_body()
            )
            assert deployed.status_code in (200, 201), deployed.text
            try:
                yield found
            finally:  # a minimum the test set would keep a replica through later modules
                await api.delete(f"/v1/apps/{app}")


async def test_list_page_stats_logs_scaling_and_stop(
    platform: Platform, customer: Customer
) -> None:
    browser, target = customer.browser, f"{customer.app}/echo"
    listed = await browser.get("/console/deployments")
    assert f'href="/console/deployments/{target}"' in listed.text
    assert "scaled to zero" in listed.text

    async with customer.api(platform) as api:
        for text in ("one", "two", "fail"):
            await api.post(f"/v1/run/{target}", json={"text": text})

    async def counted() -> str:
        page = await browser.get(f"/console/deployments/{target}")
        assert page.status_code == 200
        assert re.search(r"Requests, 24 h</div><div class=\"value\">3<", page.text), "not yet"
        return page.text

    html = await eventually(counted, within_s=30, what="the three calls on the page")
    assert re.search(r"Errors, 24 h</div><div class=\"value\">1<", html)
    assert 'Cold starts, 24 h</div><div class="value">1<' in html
    assert f"{platform.url}/v1/run/{target}" in html  # the quick start's real URL
    assert '<svg class="chart"' in html
    page = await browser.get(f"/console/deployments/{target}")

    # The log lines arrive on the live panel's stream.
    async with browser.stream("GET", f"/console/deployments/{target}/logs") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        seen = []
        async for line in events.aiter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:])["append"])
                if any("echoing fail" in s for s in seen):
                    break
    assert any("stdout: echoing one" in s for s in seen), seen

    # Scaling from the form applies through the API.
    scaled = await browser.post(
        f"/console/deployments/{target}",
        data={"csrf": csrf_of(page), "action": "scale", "min_replicas": "1", "max_replicas": "1",
              "idle_timeout": "120"},
    )  # fmt: skip
    assert "Scaling saved" in scaled.text
    async with customer.api(platform) as api:
        function = (await api.get(f"/v1/functions/{target}")).json()
    assert (function["min_replicas"], function["idle_timeout"]) == (1, 120)
    bad = await browser.post(
        f"/console/deployments/{target}",
        data={"csrf": csrf_of(page), "action": "scale", "min_replicas": "3", "max_replicas": "1"},
    )
    assert "min_replicas" in bad.text

    # The replicas panel's stream tells of the replica the minimum keeps.
    async with browser.stream("GET", f"/console/deployments/{target}/replicas") as events:
        async for line in events.aiter_lines():
            if line.startswith("data: ") and "ready" in json.loads(line[6:])["replicas"]:
                break

    stopped = await browser.post(
        f"/console/deployments/{target}", data={"csrf": csrf_of(page), "action": "stop"}
    )
    assert stopped.status_code == 303
    assert target not in (await browser.get("/console/deployments")).text


async def test_another_customers_deployment_is_not_found(
    platform: Platform, customer: Customer
) -> None:
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as stranger:
        await register(platform, stranger, fresh_email())
        target = f"{customer.app}/echo"
        for path in (f"/console/deployments/{target}", f"/console/deployments/{target}/logs"):
            seen = await stranger.get(path)
            assert seen.status_code == 404, path
            assert f"function 'echo' not found in app {customer.app!r}" in seen.text.replace(
                "&#39;", "'"
            )
        page = await stranger.get("/console/keys")
        tampered = await stranger.post(
            f"/console/deployments/{target}", data={"csrf": csrf_of(page), "action": "stop"}
        )
        assert tampered.status_code == 404
    async with customer.api(platform) as api:
        assert (await api.get(f"/v1/functions/{target}")).status_code == 200


async def test_catalog_entries_deploy_from_the_form(platform: Platform, customer: Customer) -> None:
    browser = customer.browser
    page = await browser.get("/console/catalog")
    assert page.status_code == 200
    for slug in ("chat", "completions", "embeddings", "image"):
        assert f'name="catalog" value="{slug}"' in page.text
    assert re.search(r"<td>L4</td><td>\$[\d.]+</td>", page.text)  # a price per hour
    bad = await post_form(
        browser, "/console/catalog", {"catalog": "embeddings", "name": "Not A Name", "gpu": "none"}
    )
    assert "1 to 63 lowercase letters" in bad.text
    name = f"emb-{secrets.token_hex(3)}"
    made = await post_form(
        browser, "/console/catalog",
        {"catalog": "embeddings", "name": name, "model": "/models/minilm", "gpu": "none",
         "min_replicas": "0", "max_replicas": "1", "idle_timeout": "60"},
    )  # fmt: skip
    assert made.status_code == 303
    assert made.headers["location"] == "/console/deployments"
    listed = await browser.get("/console/deployments")
    assert f"{name}/Embeddings" in listed.text
    async with customer.api(platform) as api:
        deployment = (await api.get(f"/v1/deployments/{name}")).json()
    assert deployment["served_model"] == "/models/minilm"
    assert deployment["idle_timeout"] == 60
