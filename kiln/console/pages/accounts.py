"""Signing up, in and out: register, confirm the address, sign in, forgotten passwords, joining
a customer through an invitation, and inviting one (owners)."""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response

from kiln.console.pages.page import page, refusal
from kiln.console.sessions import COOKIE, SESSION_TTL
from kiln.console.throttle import Rule
from kiln.console.web import (
    base_url,
    checked_form,
    console,
    field,
    redirect,
    render,
    signed_in,
    user_of,
)
from kiln.db.models_console import EMAIL_CHARS
from kiln.errors import KilnError, PermissionDenied

__all__ = ["ACCOUNT_ROUTES"]

# Per account: enough for typing mistakes, far too few for guessing. Per address: more, since
# an office or a carrier puts many people behind one.
LOGIN = Rule("sign-in", limit=10, window_s=15 * 60)
LOGIN_ADDRESS = Rule("sign-in", limit=100, window_s=15 * 60)
RESET = Rule("password reset", limit=5, window_s=60 * 60)
RESET_ADDRESS = Rule("password reset", limit=50, window_s=60 * 60)
REGISTER_ADDRESS = Rule("registration", limit=50, window_s=60 * 60)


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _safe_next(raw: str) -> str:
    """Where to go after signing in: a console path, never another site."""
    if raw.startswith("/console") and not raw.startswith("//"):
        return raw
    return "/console/"


async def _signed_in_as(request: Request, user_id: uuid.UUID, to: str) -> Response:
    """Open a session for the user and go to `to` with its cookie."""
    parts = console(request)
    token = await parts.sessions.open(
        user_id,
        address=_address(request),
        user_agent=request.headers.get("user-agent", ""),
    )
    response = redirect(to)
    response.set_cookie(
        COOKIE, token, max_age=int(SESSION_TTL.total_seconds()), httponly=True,
        samesite="lax", secure=parts.secure_cookies, path="/",
    )  # fmt: skip
    return response


@page
async def login(request: Request) -> Response:
    after = _safe_next(request.query_params.get("next", ""))
    if request.method == "GET":
        if await signed_in(request, optional=True) is not None:
            return redirect(after)
        return render(request, "login.html", after=after, email="", error=None)
    form = await checked_form(request, None)
    email = field(form, "email").strip().lower()[:EMAIL_CHARS]
    after = _safe_next(field(form, "next"))
    parts = console(request)
    try:
        await parts.throttle.attempt(
            (LOGIN_ADDRESS, f"address:{_address(request)}"), (LOGIN, f"account:{email}")
        )
        user_id = await parts.accounts.sign_in(email, field(form, "password"))
    except KilnError as exc:
        status, message = refusal(exc)
        return render(request, "login.html", status=status, after=after, email=email, error=message)
    return await _signed_in_as(request, user_id, after)


@page
async def logout(request: Request) -> Response:
    user = await user_of(request)
    await checked_form(request, user)
    await console(request).sessions.revoke(user.session_id)
    response = redirect("/console/login")
    response.delete_cookie(COOKIE, path="/")
    return response


@page
async def register(request: Request) -> Response:
    if request.method == "GET":
        return render(request, "register.html", email="", name="", organisation="", error=None)
    form = await checked_form(request, None)
    values = {k: field(form, k) for k in ("email", "name", "organisation")}
    try:
        await console(request).throttle.attempt((REGISTER_ADDRESS, f"address:{_address(request)}"))
        await console(request).accounts.register(
            password=field(form, "password"), base_url=base_url(request), **values
        )
    except KilnError as exc:
        status, message = refusal(exc)
        return render(request, "register.html", status=status, error=message, **values)
    return render(
        request, "notice.html", title="Check your mail",
        message=f"We sent a link to {values['email'].strip().lower()}: follow it to confirm "
        "your address, then sign in.",
    )  # fmt: skip


@page
async def verify(request: Request) -> Response:
    """GET shows a button, POST confirms: a mail scanner that follows links must not use up
    the link before its reader does."""
    if request.method == "GET":
        return render(request, "verify.html", token=request.query_params.get("token", ""))
    form = await checked_form(request, None)
    user_id = await console(request).accounts.verify(field(form, "token"))
    return await _signed_in_as(request, user_id, "/console/")


@page
async def forgot(request: Request) -> Response:
    if request.method == "GET":
        return render(request, "forgot.html", email="", error=None)
    form = await checked_form(request, None)
    email = field(form, "email").strip().lower()[:EMAIL_CHARS]
    parts = console(request)
    try:
        await parts.throttle.attempt(
            (RESET_ADDRESS, f"address:{_address(request)}"), (RESET, f"account:{email}")
        )
    except KilnError as exc:
        status, message = refusal(exc)
        return render(request, "forgot.html", status=status, email=email, error=message)
    await parts.accounts.request_reset(email, base_url=base_url(request))
    return render(
        request, "notice.html", title="Check your mail",
        message=f"If {email} has a Kiln account, a link to choose a new password is on its way.",
    )  # fmt: skip


@page
async def reset(request: Request) -> Response:
    if request.method == "GET":
        token = request.query_params.get("token", "")
        return render(request, "reset.html", token=token, error=None)
    form = await checked_form(request, None)
    token = field(form, "token")
    try:
        user_id = await console(request).accounts.reset(token, field(form, "password"))
    except KilnError as exc:
        status, message = refusal(exc)
        return render(request, "reset.html", status=status, token=token, error=message)
    return await _signed_in_as(request, user_id, "/console/")


@page
async def join(request: Request) -> Response:
    if request.method == "GET":
        token = request.query_params.get("token", "")
        return render(request, "join.html", token=token, name="", error=None)
    form = await checked_form(request, None)
    token, name = field(form, "token"), field(form, "name")
    try:
        user_id = await console(request).accounts.join(
            token, password=field(form, "password"), name=name
        )
    except KilnError as exc:
        status, message = refusal(exc)
        return render(request, "join.html", status=status, token=token, name=name, error=message)
    return await _signed_in_as(request, user_id, "/console/")


@page
async def members(request: Request) -> Response:
    """The customer's users; owners invite more."""
    user = await user_of(request)
    if user.customer_id is None:
        return redirect("/console/operator")
    notice = error = None
    if request.method == "POST":
        form = await checked_form(request, user)
        if not user.owner:
            raise PermissionDenied("only the organisation's owner invites members")
        email = field(form, "email")
        try:
            await console(request).accounts.invite(
                customer_id=user.customer_id, inviter=user.name or user.email, email=email,
                base_url=base_url(request),
            )  # fmt: skip
            notice = f"Invitation sent to {email.strip().lower()}."
        except KilnError as exc:
            error = refusal(exc)[1]
    people = await console(request).accounts.members(user.customer_id)
    return render(request, "members.html", user, people=people, notice=notice, error=error)


ACCOUNT_ROUTES = [
    ("/login", login, ["GET", "POST"]),
    ("/logout", logout, ["POST"]),
    ("/register", register, ["GET", "POST"]),
    ("/verify", verify, ["GET", "POST"]),
    ("/forgot", forgot, ["GET", "POST"]),
    ("/reset", reset, ["GET", "POST"]),
    ("/join", join, ["GET", "POST"]),
    ("/members", members, ["GET", "POST"]),
]
