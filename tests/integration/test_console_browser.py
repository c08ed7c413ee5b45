"""The console in a real headless Chromium (tests/integration/browser.py): register, confirm
through the mailed link, see the dashboard; make a key, see it once, revoke it and see the API
refuse it; a form sent without its CSRF token is refused; the pages work at phone width and by
keyboard. Every page visited is saved as a screenshot."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from browser import chromium, shots, signed_up, snap
from eventually import eventually
from playwright.async_api import Browser, expect
from stack import Platform

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
