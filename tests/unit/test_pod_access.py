"""What a pod's server gets of a caller's headers (kiln.router.pod_access), and the console's
same-site check it shares: Kiln's cookies out, the pod's own kept, the platform's own Origin
and Referer made the pod server's, and everything else as sent. (tests/integration/
test_pods_e2e.py meets the same through the router, Jupyter included.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from starlette.requests import HTTPConnection

from kiln.console.web import sent_from_here
from kiln.router.pod_access import pod_header, sets_kiln_cookie

PUBLIC = "https://kiln.example.com"  # KILN_URL: the platform's public origin, behind a proxy


def connection(*headers: tuple[str, str], kind: str = "http") -> HTTPConnection:
    """A request that reached the router at 127.0.0.1:8000."""
    services = SimpleNamespace(settings=SimpleNamespace(url=PUBLIC))
    return HTTPConnection({
        "type": kind, "method": "GET", "scheme": "ws" if kind == "websocket" else "http",
        "server": ("127.0.0.1", 8000), "path": "/v1/pods/p/ports/8888/lab", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"),
                    *((k.encode(), v.encode()) for k, v in headers)],
        "app": SimpleNamespace(state=SimpleNamespace(services=services)),
    })  # fmt: skip


def sent(name: str, value: str, *, kind: str = "http") -> str | None:
    got = pod_header(connection(kind=kind), name.encode(), value.encode(), 8888)
    return None if got is None else got.decode()


def test_kilns_cookies_are_taken_out_and_the_pods_own_kept() -> None:
    cookies = "kiln_session=a; theirs=1; kiln_viewing=b; _xsrf=c|d; kiln_csrf=e"
    assert sent("Cookie", cookies) == "theirs=1; _xsrf=c|d"
    assert sent("cookie", "kiln_session=a") is None  # nothing left: no header at all
    assert sent("cookie", "kiln_session_2=a") == "kiln_session_2=a"  # another name


@pytest.mark.parametrize(
    ("name", "value", "seen"),
    [
        ("origin", "http://127.0.0.1:8000", "http://127.0.0.1:8888"),
        ("origin", PUBLIC, "http://127.0.0.1:8888"),
        ("referer", f"{PUBLIC}/v1/pods/p/ports/8888/lab?x=1", "http://127.0.0.1:8888/v1/pods/p/ports/8888/lab?x=1"),
        ("origin", "https://elsewhere.example", "https://elsewhere.example"),
        ("origin", "http://127.0.0.1:8000.elsewhere.example", "http://127.0.0.1:8000.elsewhere.example"),
        ("referer", "http://127.0.0.1:8000@elsewhere.example/", "http://127.0.0.1:8000@elsewhere.example/"),
        ("origin", "null", "null"),
        ("x-xsrftoken", "c|d", "c|d"),
    ],
)  # fmt: skip
def test_the_platforms_own_pages_are_the_pod_servers_own(name: str, value: str, seen: str) -> None:
    assert sent(name, value) == seen


def test_a_websockets_origin_is_the_platforms_http_origin() -> None:
    assert sent("origin", "http://127.0.0.1:8000", kind="websocket") == "http://127.0.0.1:8888"


def test_a_pod_cannot_set_kilns_cookies() -> None:
    assert sets_kiln_cookie(b"kiln_session=planted; Path=/; HttpOnly")
    assert sets_kiln_cookie(b" kiln_viewing =x")
    assert not sets_kiln_cookie(b"_xsrf=2|abc; Path=/v1/pods/p/ports/8888/")
    assert not sets_kiln_cookie(b"kiln_session_2=x")


@pytest.mark.parametrize(
    ("headers", "here"),
    [
        ((("origin", "http://127.0.0.1:8000"),), True),
        ((("origin", PUBLIC),), True),
        ((("origin", "https://elsewhere.example"), ("sec-fetch-site", "same-origin")), False),
        ((("referer", "http://127.0.0.1:8000/console/pods"),), True),
        ((("referer", "https://elsewhere.example/"),), False),
        ((("sec-fetch-site", "same-origin"),), True),
        ((("sec-fetch-site", "cross-site"),), False),
        ((), False),
    ],
)
def test_sent_from_here_reads_origin_then_referer_then_sec_fetch_site(
    headers: tuple[tuple[str, str], ...], here: bool
) -> None:
    assert sent_from_here(connection(*headers)) is here
