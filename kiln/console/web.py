"""What every console page uses: who is signed in, the checks a form passes before anything it
asks is done (the `Origin` header, then the CSRF token), and rendering a template (Jinja2,
autoescaped, with headers that keep other sites from framing or scripting the page)."""

from __future__ import annotations

import secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from starlette.datastructures import FormData
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from kiln.console.accounts import Accounts
from kiln.console.sessions import COOKIE, VIEWING_COOKIE, SessionStore, SignedIn
from kiln.console.throttle import Throttle
from kiln.errors import InvalidRequest, PermissionDenied
from kiln.router.services import services

__all__ = [
    "ANON_CSRF_COOKIE",
    "Console",
    "SignInFirst",
    "checked_form",
    "console",
    "render",
    "sent_from_here",
    "signed_in",
]

ANON_CSRF_COOKIE = "kiln_csrf"  # the CSRF token of forms shown to nobody signed in yet
_TEMPLATES = Path(__file__).parent / "templates"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def money(micros: int, currency: str = "usd") -> str:
    """An amount of micro-units as people read it: $1,234.56 (other currencies: 1,234.56 EUR)."""
    amount = f"{abs(micros) / 1_000_000:,.2f}"
    sign = "-" if micros < 0 else ""
    return f"{sign}${amount}" if currency == "usd" else f"{sign}{amount} {currency.upper()}"


_ENV.globals["money"] = money


@dataclass(frozen=True)
class Console:
    """The console's parts, opened with the router's services."""

    accounts: Accounts
    sessions: SessionStore
    throttle: Throttle
    secure_cookies: bool  # Secure cookies: everywhere but `kiln dev` and the tests


def console(request: HTTPConnection) -> Console:
    found = services(request).console
    assert found is not None
    return found


class SignInFirst(Exception):
    """Raised by a page that needs a signed-in user; answered with a redirect to sign in."""

    def __init__(self, after: str) -> None:
        self.after = after


async def signed_in(request: HTTPConnection, *, optional: bool = False) -> SignedIn | None:
    """The request's signed-in user (cached on the request); `SignInFirst` when there is
    none, unless `optional`. A WebSocket's handshake carries the cookie too."""
    if "console_user" not in request.scope:
        token = request.cookies.get(COOKIE, "")
        found = await console(request).sessions.find(token) if token else None
        viewing = request.cookies.get(VIEWING_COOKIE)
        if found is not None and found.operator and viewing:
            found = await console(request).sessions.viewing(found, viewing)
        request.scope["console_user"] = found
    user: SignedIn | None = request.scope["console_user"]
    if user is None and not optional:
        raise SignInFirst(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return user


async def user_of(request: Request) -> SignedIn:
    user = await signed_in(request)
    assert user is not None
    return user


def own_origin(request: HTTPConnection) -> set[str]:
    """The origins a form of this console may be posted from: the one the request reached,
    and the platform's public URL when one is set."""
    scheme = {"ws": "http", "wss": "https"}.get(request.url.scheme, request.url.scheme)
    origins = {f"{scheme}://{request.url.netloc}"}
    public = services(request).settings.url
    if public:
        parts = urllib.parse.urlsplit(public)
        origins.add(f"{parts.scheme}://{parts.netloc}")
    return origins


def sent_from_here(request: HTTPConnection) -> bool:
    """Whether a browser sent the request from one of the platform's own pages: its `Origin`
    (lacking one, its `Referer`'s) is the platform's, or, lacking both, the browser said
    `Sec-Fetch-Site: same-origin` (a header no page can set)."""
    origin = request.headers.get("origin")
    if origin is None and (referer := request.headers.get("referer")):
        parts = urllib.parse.urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin is None:
        return request.headers.get("sec-fetch-site") == "same-origin"
    return origin in own_origin(request)


async def checked_form(request: Request, user: SignedIn | None) -> FormData:
    """The posted form, once it was sent from this console's pages (`sent_from_here`) and
    its CSRF token is the session's (or, before sign-in, the CSRF cookie's)."""
    if not sent_from_here(request):
        raise PermissionDenied(
            "this form was posted from another site (its Origin is not this console's)"
        )
    form = await request.form(max_files=0, max_fields=50)
    sent = form.get("csrf")
    expected = user.csrf if user is not None else request.cookies.get(ANON_CSRF_COOKIE, "")
    if not isinstance(sent, str) or not expected or not secrets.compare_digest(sent, expected):
        raise PermissionDenied(
            "this form's security token is missing or stale: reload the page and send it again"
        )
    return form


def field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def whole_numbers(form: FormData, names: tuple[str, ...]) -> dict[str, int]:
    """The form's fields `names` that were filled in, as integers (an API body's scaling
    fields); `InvalidRequest` naming one that is not a whole number."""
    numbers = {}
    for name in names:
        raw = field(form, name).strip()
        if not raw:
            continue
        try:
            numbers[name] = int(raw)
        except ValueError:
            raise InvalidRequest(f"{name}={raw!r} is not a whole number") from None
    return numbers


def render(
    request: Request,
    template: str,
    user: SignedIn | None = None,
    /,
    *,
    status: int = 200,
    **context: Any,
) -> Response:
    """A page. Forms on pages for nobody signed in get the CSRF cookie's token."""
    csrf = user.csrf if user is not None else request.cookies.get(ANON_CSRF_COOKIE) or ""
    fresh = user is None and not csrf
    if fresh:
        csrf = secrets.token_urlsafe(24)
    html = _ENV.get_template(template).render(
        user=user, csrf=csrf, path=request.url.path, base_url=base_url(request), **context
    )
    response = HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)
    if fresh:
        response.set_cookie(
            ANON_CSRF_COOKIE, csrf, httponly=True, samesite="strict",
            secure=console(request).secure_cookies, path="/console",
        )  # fmt: skip
    return response


# No framing by other sites, no sniffing, no referrer leaving the console with tokens in it,
# and scripts only from the console itself.
_PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}


def base_url(request: Request) -> str:
    """The platform's public URL, or the one this request reached."""
    public = services(request).settings.url
    return (public or f"{request.url.scheme}://{request.url.netloc}").rstrip("/")


def redirect(to: str) -> Response:
    return RedirectResponse(to, status_code=303)
