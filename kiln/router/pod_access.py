"""Who may use a pod's forwarded ports (`/v1/pods/ID/ports/PORT/...`), and what of the caller's
request the pod's server gets.

A script passes an API key (`Authorization: Bearer`), as on every route. A browser has none: it
passes the console's session cookie, which opens the ports of the pods of the signed-in user's
customer (another's pod is 404, as for a key). The browser sends that cookie whichever site
asks it to, so a request that only the cookie authenticates must come from the platform's own
pages when it can change something: an unsafe method (POST, PUT, PATCH, DELETE) or a WebSocket
from another site is refused (`Origin`, else `Sec-Fetch-Site`). The pod's own defence, such as
Jupyter's `_xsrf` cookie and `X-XSRFToken` header, passes through untouched.

A pod's pages are served on the platform's origin, beside the console, and run with the rights
of whoever opens them: so that a customer's page never runs with an operator's rights, an
operator's session opens only the platform's own pods (the default customer's, which operator
keys make), whichever customer the operator is viewing. Kiln's cookies and the caller's
`Authorization` never reach the pod, and a pod's answer cannot set Kiln's cookies.
"""

from __future__ import annotations

import urllib.parse

from starlette.requests import HTTPConnection

from kiln.console.api import principal_of
from kiln.console.sessions import COOKIE, VIEWING_COOKIE
from kiln.console.web import ANON_CSRF_COOKIE, own_origin, sent_from_here, signed_in
from kiln.db.enums import ApiKeyKind
from kiln.db.models_access import DEFAULT_CUSTOMER_ID
from kiln.errors import PermissionDenied, Unauthenticated
from kiln.router.auth import SCOPE_CONSOLE, Principal
from kiln.router.services import services

__all__ = ["pod_header", "port_caller", "sets_kiln_cookie"]

_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_KILN_COOKIES = frozenset(name.encode() for name in (COOKIE, VIEWING_COOKIE, ANON_CSRF_COOKIE))
_OR_KEY = "or pass an API key as `Authorization: Bearer kiln_...`"


async def port_caller(connection: HTTPConnection) -> Principal:
    """The API key's principal when the request has an `Authorization` header; else the
    principal of the console user whose session cookie it carries: an account key of their
    customer (an operator's: of the default customer)."""
    svc = services(connection)
    websocket = connection.scope["type"] == "websocket"
    if "authorization" in connection.headers:
        return await svc.auth.authenticate(connection, count=not websocket)
    user = await signed_in(connection, optional=True)
    if user is None:
        svc.auth.on_reject("missing")
        if connection.cookies.get(COOKIE):
            raise Unauthenticated(f"your console session has ended: sign in again, {_OR_KEY}")
        raise Unauthenticated(f"sign in to the console to open a pod's port, {_OR_KEY}")
    if (websocket or connection.scope["method"] not in _SAFE) and not sent_from_here(connection):
        raise PermissionDenied(
            "this request came from another site (its Origin is not the platform's): a pod's "
            f"port takes the console's session only from the platform's own pages; {_OR_KEY}"
        )
    if user.operator:
        connection.scope[SCOPE_CONSOLE] = svc.auth.principal_for(
            user.session_id, ApiKeyKind.ACCOUNT, DEFAULT_CUSTOMER_ID, None, None, None
        )
    else:
        connection.scope[SCOPE_CONSOLE] = principal_of(connection, user)
    return await svc.auth.authenticate(connection, count=False)


def pod_header(connection: HTTPConnection, name: bytes, value: bytes, port: int) -> bytes | None:
    """What the pod's server gets of one of the request's headers (None: nothing).

    Kiln's cookies are taken out of `Cookie`. An `Origin` or `Referer` of the platform's own
    pages names the pod's server instead (`http://127.0.0.1:PORT`, the `Host` it gets), so a
    server that checks that a page is its own (Jupyter compares `Origin` with `Host`) takes
    the pages it served through the router; `X-Forwarded-Host` still names the platform."""
    name = name.lower()
    if name == b"cookie":
        kept = [c for c in value.split(b";") if _cookie_name(c) not in _KILN_COOKIES]
        return b";".join(kept).strip() or None
    if name in (b"origin", b"referer"):
        text = value.decode("latin-1")
        parts = urllib.parse.urlsplit(text)
        site = f"{parts.scheme}://{parts.netloc}"
        if text.startswith(site) and site in own_origin(connection):
            return f"http://127.0.0.1:{port}{text[len(site) :]}".encode("latin-1")
    return value


def sets_kiln_cookie(set_cookie: bytes) -> bool:
    """Whether a `Set-Cookie` of the pod's answer names one of Kiln's cookies."""
    return _cookie_name(set_cookie) in _KILN_COOKIES


def _cookie_name(pair: bytes) -> bytes:
    return pair.split(b";", 1)[0].split(b"=", 1)[0].strip()
