"""The console in a real headless Chromium (tests/integration/browser.py): register, confirm
through the mailed link, see the dashboard; make a key, see it once, revoke it and see the API
refuse it; a form sent without its CSRF token is refused; the pages work at phone width and by
keyboard. Every page visited is saved as a screenshot."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
from browser import chromium, new_operator, shots, signed_up, snap
from eventually import eventually
from playwright.async_api import Browser, expect
from stack import Platform

from kiln.functions.package import package

pytestmark = [pytest.mark.integration]
__all__ = ["chromium", "shots"]  # fixtures, used by name


async def test_sign_up_confirm_and_dashboard(
    platform: Platform, chromium: Browser, shots: Path
) -> None:
    page = await signed_up(platform, chromium, shots)
    await expect(page.locator("#balance")).to_have_text("$0.00")
    await snap(page, shots, "dashboard")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await snap(page, shots, "login")


async def test_a_key_is_shown_once_and_revoked_keys_are_refused(
    platform: Platform, chromium: Browser, shots: Path
) -> None:
    page = await signed_up(platform, chromium, shots)
    await page.get_by_role("link", name="API keys").click()
    await page.get_by_label("Name").fill("laptop")
    await page.get_by_role("button", name="Create key").click()
    secret = await page.locator("#new-key").inner_text()
    assert secret.startswith("kiln_")
    await snap(page, shots, "keys")
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Authorization": f"Bearer {secret}"}
    ) as api:
        assert (await api.get("/v1/functions")).status_code == 200
        page.once("dialog", lambda dialog: dialog.accept())
        await page.get_by_role("button", name="Revoke key laptop").click()
        await expect(page.get_by_role("cell", name="revoked")).to_be_visible()
        assert secret not in await page.content()

        async def refused() -> bool:
            return (await api.get("/v1/functions")).status_code == 401

        await eventually(refused, within_s=10, what="the revoked key refused by the API")


async def test_a_form_without_its_csrf_token_is_refused(
    platform: Platform, chromium: Browser, shots: Path
) -> None:
    page = await signed_up(platform, chromium, shots)
    await page.get_by_role("link", name="API keys").click()
    await page.evaluate(
        "document.querySelectorAll('input[name=csrf]').forEach((input) => input.remove())"
    )
    await page.get_by_role("button", name="Create key").click()
    await expect(page.get_by_role("alert")).to_contain_text("security token is missing or stale")
    await snap(page, shots, "refused")


async def test_pages_fit_a_phone(platform: Platform, chromium: Browser, shots: Path) -> None:
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    page = await signed_up(platform, chromium, shots, **phone)
    for name, path in (("phone-dashboard", "/console/"), ("phone-keys", "/console/keys")):
        await page.goto(f"{platform.url}{path}")
        wide = await page.evaluate("document.documentElement.scrollWidth")
        assert wide <= 390, f"{path} is {wide} px wide on a 390 px screen"
        await snap(page, shots, name)
    # By keyboard: the first Tab reaches the skip link, which leads to the content.
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()


async def test_a_deployment_its_replica_and_its_logs_live(
    platform: Platform, chromium: Browser, shots: Path, tmp_path: Path
) -> None:
    """Deployed with a key made on the keys page; scaled up from its page, whose replicas
    panel then shows the replica arrive, and a call's log line arrives on the logs panel; the
    dashboard's running cost moves while the replica runs."""
    page = await signed_up(platform, chromium, shots)
    await page.get_by_role("link", name="API keys").click()
    await page.get_by_role("button", name="Create key").click()
    secret = await page.locator("#new-key").inner_text()
    name = f"live-{secrets.token_hex(3)}"
    (tmp_path / "live_app.py").write_text(LIVE_APP.format(name=name))
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60
    ) as api:
        customer_id = (await api.get("/v1/billing/balance")).json()["customer_id"]
        async with platform.client() as operator:
            await operator.post(
                "/v1/billing/credits", json={"customer_id": customer_id, "amount_micros": 10**8}
            )
        deployed = await api.post("/v1/apps", json=package(tmp_path / "live_app.py").deploy_body())
        assert deployed.status_code in (200, 201), deployed.text

        await page.get_by_role("link", name="Deployments").click()
        await page.get_by_role("link", name=f"{name}/hello").click()
        await expect(page.get_by_role("heading", name=f"{name}/hello")).to_be_visible()
        await page.get_by_label("Min replicas").fill("1")
        await page.get_by_role("button", name="Save scaling").click()
        try:
            await expect(page.get_by_role("status")).to_contain_text("Scaling saved")
            await expect(page.locator("[data-field=replicas]")).to_contain_text(
                "1 ready", timeout=60_000
            )
            answer = await api.post(f"/v1/run/{name}/hello", json={"who": "Ada"})
            assert answer.json() == "hello Ada"
            await expect(page.locator(".logs")).to_contain_text(
                "saying hello to Ada", timeout=20_000
            )
            await snap(page, shots, "deployment")

            await page.get_by_role("link", name="Dashboard").click()
            await expect(page.locator("[data-field=replicas]")).to_have_text("1")
            await expect(page.locator("[data-field=hourly]")).not_to_have_text("$0.00")
            await snap(page, shots, "dashboard-running")
        finally:  # its minimum would keep a replica (and a slot) through the later modules
            await api.delete(f"/v1/apps/{name}")


LIVE_APP = """
import kiln

app = kiln.App("{name}")


@app.function(min_replicas=0, max_replicas=1)
def hello(who: str) -> str:
    print(f"saying hello to {{who}}")
    return f"hello {{who}}"
"""


async def test_the_other_pages(platform: Platform, chromium: Browser, shots: Path) -> None:
    """The catalog and members pages a customer sees, and the operators' pages."""
    page = await signed_up(platform, chromium, shots)
    await page.get_by_role("link", name="Catalog", exact=True).click()
    await expect(
        page.get_by_role("button", name="Deploy Chat with an instruction-tuned language model")
    ).to_be_visible()
    await snap(page, shots, "catalog")
    await page.get_by_role("link", name="Members").click()
    await expect(page.get_by_role("heading", name="Invite a member")).to_be_visible()
    await snap(page, shots, "members")
    await page.get_by_role("link", name="Deployments").click()
    await snap(page, shots, "deployments")

    email, password = await new_operator(platform)
    operator = await (await chromium.new_context()).new_page()
    await operator.goto(f"{platform.url}/console/login")
    await operator.get_by_label("Email").fill(email)
    await operator.get_by_label("Password").fill(password)
    await operator.get_by_role("button", name="Sign in").click()
    await expect(operator.get_by_role("heading", name="Customers")).to_be_visible()
    await expect(operator.get_by_role("cell", name="Analytical Engines").first).to_be_visible()
    await snap(operator, shots, "operator-customers")
    await operator.get_by_role("link", name="Nodes").click()
    await expect(operator.get_by_role("heading", name="Queues")).to_be_visible()
    await snap(operator, shots, "operator-nodes")


async def test_another_customers_deployment_is_not_found(
    platform: Platform, chromium: Browser, shots: Path, tmp_path: Path
) -> None:
    name = f"theirs-{secrets.token_hex(3)}"
    await platform.deploy_source(tmp_path, "theirs.py", LIVE_APP.format(name=name))
    page = await signed_up(platform, chromium, shots)
    answer = await page.goto(f"{platform.url}/console/deployments/{name}/hello")
    assert answer is not None
    assert answer.status == 404
    await expect(page.get_by_role("alert")).to_contain_text(f"not found in app '{name}'")
    await snap(page, shots, "not-found")
