"""Chromium for the console's browser tests: Debian's `chromium`, driven by Playwright (no
browser is ever downloaded). A module that imports `chromium` skips, saying how to install the
browser, where there is none. Every page a test visits can be saved as a screenshot (to
$CONSOLE_SCREENSHOTS when set: docs/console/ holds the current ones)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from stack import Platform
from test_console_accounts import PASSWORD, mailed_link

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

__all__ = ["chromium", "new_operator", "shots", "signed_up", "snap"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
async def chromium() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.skip(
            "the console's browser tests need Chromium: install Debian's package "
            "(apt-get install chromium); Playwright drives it, no browser is downloaded"
        )
    from playwright.async_api import async_playwright

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
    from playwright.async_api import expect

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


async def new_operator(platform: Platform) -> tuple[str, str]:
    """An operator user of its own (address, password), as `kiln dev` makes its one."""
    import uuid

    from kiln.console.passwords import hash_password
    from kiln.db.enums import UserRole
    from kiln.db.models import User
    from kiln.db.session import create_engine, session_factory, transaction

    email = f"operator-{secrets.token_hex(3)}@kiln.local"
    password = secrets.token_urlsafe(12)
    engine = create_engine(platform.settings)
    try:
        async with transaction(session_factory(engine)) as session:
            session.add(
                User(
                    id=uuid.uuid4(),
                    role=UserRole.OPERATOR,
                    email=email,
                    name="Operator",
                    password_hash=await hash_password(password),
                    verified_at=datetime.now(UTC),
                )
            )
    finally:
        await engine.dispose()
    return email, password
