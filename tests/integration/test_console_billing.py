"""The console's billing page on a platform that takes payments (through the local fake of
Stripe's API): adding funds through Checkout (in Chromium, and by form), the balance growing
once Stripe's webhook says so, auto-refill and the spend cap set and refused in words, the
transactions' CSV, and the page kept from members."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from browser import chromium, shots, signed_up, snap
from eventually import eventually
from fakestripe import API_KEY, WEBHOOK_SECRET, FakeStripe
from playwright.async_api import Browser, expect
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform, running_platform
from test_console_accounts import PASSWORD, csrf_of, fresh_email, mailed_link, post_form, register
from test_invoices_e2e import per_request_plan
from test_plans_e2e import calls, worker

from kiln.billing.plans import period_of
from kiln.db.models import User
from kiln.settings import Settings

pytestmark = [pytest.mark.integration]
__all__ = ["chromium", "shots"]  # fixtures, used by name


@pytest.fixture(scope="module")
async def platform(
    settings: Settings, stripe_fake: FakeStripe, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    paying = settings.replace(
        stripe_api_key=API_KEY, stripe_api_base=stripe_fake.url,
        stripe_webhook_secret=WEBHOOK_SECRET,
    )  # fmt: skip
    async with running_platform(paying, tmp_path_factory.mktemp("console-billing")) as running:
        stripe_fake.webhook_to = running.url
        yield running


@pytest.fixture
async def owner(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as browser:
        email = fresh_email()
        await register(platform, browser, email)
        browser.headers["X-Test-Email"] = email  # which user this is, for the tests
        yield browser


def balance(page: httpx.Response) -> str:
    found = re.search(r'id="balance">([^<]+)<', page.text)
    assert found is not None, page.text[:300]
    return found.group(1)


async def test_funds_added_through_checkout(
    platform: Platform, stripe_fake: FakeStripe, owner: httpx.AsyncClient
) -> None:
    assert balance(await owner.get("/console/billing")) == "$0.00"
    sent = await post_form(owner, "/console/billing", {"action": "topup", "amount": "25.50"})
    assert sent.status_code == 200
    go = re.search(r'<a data-go href="([^"]+)"', sent.text)
    assert go is not None, sent.text
    checkout = go.group(1)
    assert checkout.startswith(f"{stripe_fake.url}/pay/")
    async with httpx.AsyncClient() as payer:
        paid = await payer.post(checkout)
    assert paid.status_code == 303
    assert paid.headers["location"] == f"{platform.url}/console/billing?paid=1"
    back = await owner.get("/console/billing?paid=1")
    assert "Thank you" in back.text
    assert balance(back) == "$25.50"
    csv = await owner.get("/console/billing/transactions.csv")
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0] == "id,created_at,kind,amount,balance_after,description"
    assert ",topup,25.500000,25.500000," in lines[1]


async def test_the_plan_and_the_monthly_invoices_with_their_files(
    platform: Platform, owner: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    page = await owner.get("/console/billing")
    assert re.search(r'id="plan">Free<', page.text), page.text[:500]
    assert "No invoices yet" in page.text
    async with engine.connect() as conn:
        customer_id = await conn.scalar(
            sa.select(User.customer_id).where(User.email == owner.headers["X-Test-Email"])
        )
    assert customer_id is not None
    async with platform.client() as operator:  # on a plan of $0.01 a request, no fee
        moved = await operator.patch(
            f"/v1/customers/{customer_id}", json={"plan": await per_request_plan(engine)}
        )
        assert moved.status_code == 200, moved.text
        await worker(platform, engine).record([calls(customer_id, datetime.now(UTC), 420)])
        closed = await operator.post("/v1/billing/close", json={
            "period": period_of(datetime.now(UTC)).label, "customer_id": str(customer_id),
        })  # fmt: skip
    (invoice_id,) = closed.json()["invoices"]
    page = await owner.get("/console/billing")
    row = re.search(r'<table id="invoices">.*?</table>', page.text, flags=re.DOTALL)
    assert row is not None
    assert "INV-" in row.group(0)
    assert "$4.20" in row.group(0)  # 420 requests at $0.01
    assert "due $4.20" in row.group(0)
    pdf = await owner.get(f"/console/billing/invoices/{invoice_id}/pdf")
    csv = await owner.get(f"/console/billing/invoices/{invoice_id}/csv")
    odd = await owner.get(f"/console/billing/invoices/{invoice_id}/xls")
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-")
    assert csv.text.splitlines()[-1].endswith(",4.20,4200000")
    assert odd.status_code == 404


async def test_refill_and_cap_are_set_and_bad_amounts_refused(owner: httpx.AsyncClient) -> None:
    saved = await post_form(
        owner, "/console/billing",
        {"action": "settings", "refill_threshold": "5", "refill_amount": "20.00",
         "spend_cap": "$1,000"},
    )  # fmt: skip
    assert "Billing settings saved." in saved.text
    assert 'name="refill_threshold" inputmode="decimal" value="5.00"' in saved.text
    assert 'name="spend_cap" inputmode="decimal" value="1000.00"' in saved.text
    bad = await post_form(
        owner, "/console/billing", {"action": "settings", "refill_threshold": "five"}
    )
    assert "refill below: &#39;five&#39; is not an amount such as 25.00" in bad.text
    half = await post_form(
        owner, "/console/billing", {"action": "settings", "refill_threshold": "5"}
    )
    assert "refill_threshold_micros and refill_amount_micros" in half.text
    fraction = await post_form(owner, "/console/billing", {"action": "topup", "amount": "1.234"})
    assert "amount: &#39;1.234&#39; is not an amount in cents" in fraction.text


async def test_members_do_not_see_billing(platform: Platform, owner: httpx.AsyncClient) -> None:
    member = fresh_email()
    await post_form(owner, "/console/members", {"email": member})
    token = (await mailed_link(platform, member, "invite")).split("token=")[1]
    async with httpx.AsyncClient(base_url=platform.url, headers={"Origin": platform.url}) as theirs:
        await post_form(
            theirs,
            f"/console/join?token={token}",
            {"token": token, "name": "", "password": PASSWORD},
        )
        refused = await theirs.get("/console/billing")
        assert refused.status_code == 403
        assert "only the organisation&#39;s owner" in refused.text
        page = await theirs.get("/console/keys")
        posted = await theirs.post(
            "/console/billing", data={"csrf": csrf_of(page), "action": "topup", "amount": "5"}
        )
        assert posted.status_code == 403


async def test_a_topup_in_the_browser(platform: Platform, chromium: Browser, shots: Path) -> None:
    page = await signed_up(platform, chromium, shots)
    await page.get_by_role("link", name="Billing").click()
    await expect(page.locator("#balance")).to_have_text("$0.00")
    await page.get_by_label("Amount (USD)").fill("40")
    await snap(page, shots, "billing")
    await page.get_by_role("button", name="Add funds with Stripe").click()
    await expect(page.get_by_role("heading", name="Pay $40.00")).to_be_visible()
    await page.get_by_role("button", name="Pay").click()
    await expect(page.get_by_role("status")).to_contain_text("Thank you")
    await expect(page.locator("#balance")).to_have_text("$40.00")

    async def on_dashboard() -> bool:
        await page.goto(f"{platform.url}/console/")
        return await page.locator("#balance").inner_text() == "$40.00"

    await eventually(on_dashboard, within_s=10, what="the dashboard's balance")
