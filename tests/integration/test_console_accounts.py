"""The console's accounts on the real stack, met as a browser meets them but through httpx (the
browser tests in tests/e2e drive Chromium): registering, confirming through the mailed link,
signing in and out, resets, invitations, the CSRF token and Origin check on every form, the
sign-in throttle, and keys made in the console working on (and revoked from) the API. Another
customer's key is out of reach by form tampering."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from email import message_from_bytes
from pathlib import Path

import httpx
import pytest
from eventually import eventually
from stack import Platform

pytestmark = [pytest.mark.integration]

PASSWORD = "correct horse battery"


def mail_folder(platform: Platform) -> Path:
    return platform.settings.home / "mail"


async def mailed_link(platform: Platform, to: str, kind: str) -> str:
    """The link in the newest mail of `kind` to `to` (the console writes mail to files when no
    SMTP server is set)."""

    def newest() -> str:
        address = to.lower()
        found = sorted(mail_folder(platform).glob(f"*-{kind}-{address}.eml"))
        assert found, f"no {kind} mail to {address} yet"
        message = message_from_bytes(found[-1].read_bytes())
        assert message["To"] == address
        text = message.get_payload(decode=True)
        assert isinstance(text, bytes)
        link = re.search(r"https?://\S+", text.decode())
        assert link is not None, text
        return link.group(0)

    link: str = await eventually(newest, within_s=10, what=f"a {kind} mail to {to}")
    return link


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


@pytest.fixture
async def browser(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    """A client that keeps cookies and sends this console's Origin, as a browser's form does."""
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}, timeout=60
    ) as client:
        yield client


async def post_form(
    client: httpx.AsyncClient, page: str, data: dict[str, str], **kwargs: object
) -> httpx.Response:
    """Fill the form on `page` (its CSRF token included) and post it to `page`'s path."""
    shown = await client.get(page)
    assert shown.status_code == 200, shown.text[:300]
    path = page.split("?")[0]
    return await client.post(path, data={"csrf": csrf_of(shown), **data}, **kwargs)  # type: ignore[arg-type]


async def register(platform: Platform, client: httpx.AsyncClient, email: str) -> httpx.Response:
    """Register `email` and follow the confirmation link: signed in on the dashboard."""
    answer = await post_form(
        client,
        "/console/register",
        {"email": email, "password": PASSWORD, "name": "Ada", "organisation": f"Org {email}"},
    )
    assert answer.status_code == 200, answer.text
    assert "Check your mail" in answer.text
    link = await mailed_link(platform, email, "verify")
    token = link.split("token=")[1]
    confirmed = await post_form(client, f"/console/verify?token={token}", {"token": token})
    assert confirmed.status_code == 303, confirmed.text
    assert confirmed.headers["location"] == "/console/"
    return await client.get("/console/", follow_redirects=True)


def fresh_email() -> str:
    return f"user-{secrets.token_hex(4)}@example.com"


async def test_register_confirm_sign_out_and_in(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    email = fresh_email()
    home = await register(platform, browser, email)
    assert home.status_code == 200
    assert f"Org {email}" in home.text
    assert "Balance" in home.text  # a customer's dashboard
    cookie = browser.cookies.get("kiln_session")
    assert cookie

    # Signing out ends the session: the old cookie opens nothing.
    out = await post_form(browser, "/console/", {}, follow_redirects=False)
    assert out.status_code == 405  # the dashboard takes no form: sign-out has its own path
    home = await browser.get("/console/")
    signed_out = await browser.post("/console/logout", data={"csrf": csrf_of(home)})
    assert signed_out.status_code == 303
    async with httpx.AsyncClient(base_url=platform.url, cookies={"kiln_session": cookie}) as old:
        again = await old.get("/console/")
    assert again.status_code == 303
    assert again.headers["location"].startswith("/console/login")

    # A wrong password and a right one.
    wrong = await post_form(
        browser, "/console/login", {"email": email, "password": "not it at all"}
    )
    assert wrong.status_code == 401
    assert "the address or the password is wrong" in wrong.text
    right = await post_form(
        browser,
        "/console/login?next=/console/keys",
        {"email": email.upper(), "password": PASSWORD, "next": "/console/keys"},
    )
    assert right.status_code == 303
    assert right.headers["location"] == "/console/keys"


async def test_an_unconfirmed_address_cannot_sign_in(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    email = fresh_email()
    await post_form(
        browser,
        "/console/register",
        {"email": email, "password": PASSWORD, "name": "", "organisation": ""},
    )
    refused = await post_form(browser, "/console/login", {"email": email, "password": PASSWORD})
    assert refused.status_code == 403
    assert "confirm your address first" in refused.text


async def test_registration_refuses_bad_input_by_name(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    short = await post_form(
        browser,
        "/console/register",
        {"email": fresh_email(), "password": "short", "name": "", "organisation": ""},
    )
    assert short.status_code == 400
    assert "password: use at least 10 characters (this one has 5)" in short.text
    bad = await post_form(
        browser,
        "/console/register",
        {"email": "not-an-address", "password": PASSWORD, "name": "", "organisation": ""},
    )
    assert bad.status_code == 400
    assert "email: &#39;not-an-address&#39; is not an email address" in bad.text


async def test_a_taken_address_is_not_revealed(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    email = fresh_email()
    await register(platform, browser, email)
    async with httpx.AsyncClient(base_url=platform.url, headers={"Origin": platform.url}) as other:
        again = await post_form(
            other,
            "/console/register",
            {"email": email, "password": PASSWORD, "name": "", "organisation": ""},
        )
    assert again.status_code == 200
    assert "Check your mail" in again.text
    assert await mailed_link(platform, email, "exists")


async def test_forms_need_their_token_and_this_origin(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    await register(platform, browser, fresh_email())
    page = await browser.get("/console/keys")
    csrf = csrf_of(page)
    missing = await browser.post("/console/keys", data={"action": "create", "name": "x"})
    assert missing.status_code == 403
    assert "security token is missing or stale" in missing.text
    stale = await browser.post("/console/keys", data={"action": "create", "csrf": "forged"})
    assert stale.status_code == 403
    elsewhere = await browser.post(
        "/console/keys",
        data={"action": "create", "csrf": csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert elsewhere.status_code == 403
    assert "posted from another site" in elsewhere.text
    # The sign-in form too (its token comes from a cookie before anyone is signed in).
    async with httpx.AsyncClient(base_url=platform.url, headers={"Origin": platform.url}) as fresh:
        anonymous = await fresh.post("/console/login", data={"email": "a@b.co", "password": "x"})
    assert anonymous.status_code == 403


async def test_sign_in_attempts_are_throttled(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    email = fresh_email()
    await register(platform, browser, email)
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Origin": platform.url}
    ) as guesser:
        statuses = [
            (
                await post_form(
                    guesser, "/console/login", {"email": email, "password": f"guess {i}"}
                )
            ).status_code
            for i in range(11)
        ]
        assert statuses[:10] == [401] * 10
        assert statuses[10] == 429
        # Even the right password waits now.
        blocked = await post_form(guesser, "/console/login", {"email": email, "password": PASSWORD})
    assert blocked.status_code == 429
    assert "too many sign-in attempts; try again in 15 minutes" in blocked.text


async def test_keys_made_in_the_console_work_and_revoked_ones_do_not(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    await register(platform, browser, fresh_email())
    made = await post_form(
        browser, "/console/keys", {"action": "create", "name": "laptop", "function": ""}
    )
    assert made.status_code == 200
    key = re.search(r'<code id="new-key">([^<]+)</code>', made.text)
    assert key is not None
    secret = key.group(1)
    api = httpx.AsyncClient(base_url=platform.url, headers={"Authorization": f"Bearer {secret}"})
    async with api:
        assert (await api.get("/v1/functions")).status_code == 200
        listed = await browser.get("/console/keys")
        assert "laptop" in listed.text
        assert secret not in listed.text  # shown once
        key_id = re.search(r'name="key" value="([^"]+)"', listed.text)
        assert key_id is not None
        revoked = await browser.post(
            "/console/keys",
            data={"csrf": csrf_of(listed), "key": key_id.group(1), "action": "revoke"},
        )
        assert revoked.status_code == 200
        assert "revoked" in revoked.text

        async def refused() -> bool:
            return (await api.get("/v1/functions")).status_code == 401

        await eventually(refused, within_s=10, what="the revoked key refused")


async def test_another_customers_key_is_out_of_reach(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    """Form tampering: a key id of another customer's, posted to revoke, is "not found"."""
    await register(platform, browser, fresh_email())
    async with platform.client() as operator:
        made = await operator.post("/v1/customers", json={"name": "someone else", "tier": "pro"})
        other = made.json()["id"]
        theirs = (await operator.post("/v1/keys", json={"customer_id": other})).json()
    page = await browser.get("/console/keys")
    tampered = await browser.post(
        "/console/keys", data={"csrf": csrf_of(page), "key": theirs["id"], "action": "revoke"}
    )
    assert tampered.status_code == 200
    assert f"key &#39;{theirs['id']}&#39; not found" in tampered.text
    async with httpx.AsyncClient(
        base_url=platform.url, headers={"Authorization": f"Bearer {theirs['key']}"}
    ) as api:
        assert (await api.get("/v1/functions")).status_code == 200


async def test_a_reset_sets_a_new_password_and_ends_old_sessions(
    platform: Platform, browser: httpx.AsyncClient
) -> None:
    email = fresh_email()
    await register(platform, browser, email)
    async with httpx.AsyncClient(base_url=platform.url, headers={"Origin": platform.url}) as other:
        asked = await post_form(other, "/console/forgot", {"email": email})
        assert "a link to choose a new password is on its way" in asked.text
        unknown = await post_form(other, "/console/forgot", {"email": fresh_email()})
        assert unknown.status_code == 200  # the same answer for an address with no account
        link = await mailed_link(platform, email, "reset")
        token = link.split("token=")[1]
        weak = await post_form(
            other, f"/console/reset?token={token}", {"token": token, "password": "x"}
        )
        assert weak.status_code == 400
        done = await post_form(
            other,
            f"/console/reset?token={token}",
            {"token": token, "password": "a brand new secret"},
        )
        assert done.status_code == 303
        reused = await post_form(
            other,
            f"/console/reset?token={token}",
            {"token": token, "password": "another new secret"},
        )
        assert reused.status_code == 404
        assert "expired or was used already" in reused.text
    # The browser signed in before the reset is signed out.
    stale = await browser.get("/console/")
    assert stale.status_code == 303
    old = await post_form(browser, "/console/login", {"email": email, "password": PASSWORD})
    assert old.status_code == 401
    new = await post_form(
        browser, "/console/login", {"email": email, "password": "a brand new secret"}
    )
    assert new.status_code == 303


async def test_an_owner_invites_a_member(platform: Platform, browser: httpx.AsyncClient) -> None:
    owner = fresh_email()
    await register(platform, browser, owner)
    member = fresh_email()
    invited = await post_form(browser, "/console/members", {"email": member})
    assert f"Invitation sent to {member}" in invited.text
    link = await mailed_link(platform, member, "invite")
    token = link.split("token=")[1]
    async with httpx.AsyncClient(base_url=platform.url, headers={"Origin": platform.url}) as theirs:
        joined = await post_form(
            theirs,
            f"/console/join?token={token}",
            {"token": token, "name": "Grace", "password": PASSWORD},
        )
        assert joined.status_code == 303
        members = await theirs.get("/console/members")
        assert owner in members.text
        assert member in members.text
        assert "Invite a member" not in members.text  # members do not invite
        refused = await theirs.post(
            "/console/members", data={"csrf": csrf_of(members), "email": fresh_email()}
        )
        assert refused.status_code == 403
        assert "only the organisation&#39;s owner invites members" in refused.text
