"""The console in a real headless Chromium (Debian's `chromium`, driven by Playwright; never a
downloaded browser): register, confirm through the mailed link, see the dashboard; make a key,
see it once, revoke it and see the API refuse it; a form sent without its CSRF token is
refused; the pages work at phone width. Every page visited is saved as a screenshot (to
$CONSOLE_SCREENSHOTS when set: docs/console/ holds the current ones)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eventually import eventually
from stack import Platform
from test_console_accounts import PASSWORD, mailed_link

pytestmark = [pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "the console's browser tests need Chromium: install Debian's package "
        "(apt-get install chromium); Playwright drives it, no browser is downloaded",
        allow_module_level=True,
    )

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402


@pytest.fixture(scope="module")
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def snap(page: Page, shots: Path, name: str) -> None:
    await page.screenshot(path=shots / f"{name}.png", full_page=True)


async def signed_up(platform: Platform, chromium: Browser, shots: Path, **context: Any) -> Page:
    """A new customer registered, confirmed and signed in, through the pages."""
    email = f"browser-{secrets.token_hex(4)}@example.com"
    page = await (await chromium.new_context(**context)).new_page()
    await page.goto(f"{platform.url}/console/")
    await expect(page).to_have_url(re.compile(r"/console/login"))
    await page.get_by_role("link", name="Create an account").click()
    await page.get_by_label("Your name").fill("Ada Lovelace")
    await page.get_by_label("Organisation").fill("Analytical Engines")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await snap(page, shots, "register")
    await page.get_by_role("button", name="Create account").click()
    await expect(page.get_by_role("heading", name="Check your mail")).to_be_visible()
    await page.goto(await mailed_link(platform, email, "verify"))
    await page.get_by_role("button", name="Confirm and sign in").click()
    await expect(page.get_by_role("heading", name="Analytical Engines")).to_be_visible()
    return page


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
