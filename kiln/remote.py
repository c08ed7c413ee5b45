"""Calling deployed functions from any Python process: `fn.remote(...)`, `fn.spawn(...)`
(a `Job` with `.get(timeout)` and `.cancel()`) and `fn.remote_gen(...)`, on a decorated
function or on `kiln.lookup("APP/NAME")` (classes: "APP/Class.method").

The Kiln URL and API key come from `KILN_URL` and `KILN_API_KEY`, else `$KILN_HOME/config.toml`
(what `kiln dev` writes), or are given to `lookup`. Arguments travel as JSON (keyword
arguments as an object, positional ones as an array; a single `bytes` argument as the raw
body); an error answer is raised as `kiln.RemoteError` with the API's code and message.

httpx is imported on first use, so `import kiln` stays light.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kiln.errors import ConfigError, KilnError

if TYPE_CHECKING:
    import httpx

__all__ = ["Job", "RemoteError", "RemoteFunction", "lookup"]

_FINISHED = ("succeeded", "failed", "cancelled", "expired")


class RemoteError(KilnError):
    """An error answer from Kiln: `code` and `message` as the API sent them."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "-") -> None:
        super().__init__(f"{message} ({code}, HTTP {status}, request {request_id})")
        self.http_status = status
        self.api_code = code
        self.api_message = message


def lookup(
    target: str, *, url: str | None = None, api_key: str | None = None, timeout_s: float = 600
) -> RemoteFunction:
    """A handle on a deployed function (`APP/NAME`) or class method (`APP/Class.method`)."""
    app, slash, name = target.partition("/")
    if not slash or not app or not name:
        raise ValueError(f"{target!r} is not APP/NAME or APP/Class.method")
    return RemoteFunction(target, url=url, api_key=api_key, timeout_s=timeout_s)


class RemoteFunction:
    def __init__(
        self,
        target: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600,
    ) -> None:
        self.target = target
        self._url = url
        self._api_key = api_key
        self._timeout_s = timeout_s

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call it and return its result (bytes for a bytes result)."""
        content, headers = _body(args, kwargs)
        with self._client() as client:
            response = _checked(
                client.post(f"/v1/run/{self.target}", content=content, headers=headers)
            )
        return _result(response)

    def remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Call a generator and yield its items as they arrive (bytes items as base64)."""
        content, headers = _body(args, kwargs)
        headers["Accept"] = "application/x-ndjson"
        with (
            self._client() as client,
            client.stream(
                "POST", f"/v1/run/{self.target}", content=content, headers=headers
            ) as response,
        ):
            if response.status_code >= 400:
                response.read()
                _checked(response)
            for line in response.iter_lines():
                if not line:
                    continue
                item = json.loads(line)
                if "error" in item:
                    error = item["error"]
                    raise RemoteError(200, error["code"], error["message"], error["request_id"])
                if item.get("end"):
                    return
                yield item["data"]

    def spawn(self, *args: Any, idempotency_key: str | None = None, **kwargs: Any) -> Job:
        """Start it as an async job; the `Job` says how it goes."""
        content, headers = _body(args, kwargs)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        with self._client() as client:
            response = _checked(
                client.post(f"/v1/spawn/{self.target}", content=content, headers=headers)
            )
        return Job(response.json()["call_id"], self)

    def _client(self) -> httpx.Client:
        import httpx

        url, key = self._url, self._api_key
        if url is None or key is None:
            from kiln.cli.main import client_settings

            settings = client_settings()
            url, key = url or settings.url, key or settings.api_key
        if not url or not key:
            raise ConfigError(
                ["no Kiln to call: set KILN_URL and KILN_API_KEY, run `kiln dev`, or pass "
                 "url= and api_key= to kiln.lookup"]
            )  # fmt: skip
        return httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(self._timeout_s, connect=10),
        )

    def __repr__(self) -> str:
        return f"<kiln remote function {self.target}>"


class Job:
    """An async job: `get()` waits for its result, `cancel()` stops it."""

    def __init__(self, call_id: str, function: RemoteFunction) -> None:
        self.call_id = call_id
        self._function = function

    def status(self) -> dict[str, Any]:
        with self._function._client() as client:
            view: dict[str, Any] = _checked(client.get(f"/v1/calls/{self.call_id}")).json()
        return view

    def get(self, timeout: float | None = None) -> Any:
        """Wait (at most `timeout` seconds) for the job to finish; its result, or its error
        raised. TimeoutError if it is still going."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        with self._function._client() as client:
            while True:
                response = client.get(f"/v1/calls/{self.call_id}")
                if response.status_code == 429:  # polling counts against the rate limit too
                    wait = float(response.headers.get("retry-after", "1"))
                    if deadline is not None and time.monotonic() + wait > deadline:
                        raise TimeoutError(f"job {self.call_id} is still running (rate-limited)")
                    time.sleep(wait)
                    continue
                view = _checked(response).json()
                if view["status"] == "succeeded":
                    if "result" in view:
                        return view["result"]
                    return _result(_checked(client.get(view["result_url"])))
                if view["status"] in _FINISHED:
                    error = view.get("error") or {"code": view["status"], "message": view["status"]}
                    raise RemoteError(
                        200, error["code"], f"the job {view['status']}: {error['message']}"
                    )
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.call_id} is still {view['status']}")
                time.sleep(
                    pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
                )
                pause = min(1.0, pause * 1.5)

    def cancel(self) -> None:
        with self._function._client() as client:
            _checked(client.post(f"/v1/calls/{self.call_id}/cancel"))

    def __repr__(self) -> str:
        return f"<kiln job {self.call_id} of {self._function.target}>"


def _body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    if len(args) == 1 and not kwargs and isinstance(args[0], bytes | bytearray):
        return bytes(args[0]), {"Content-Type": "application/octet-stream"}
    if args and kwargs:
        raise TypeError(
            "pass either positional or keyword arguments to a remote call, not both: they "
            "travel as one JSON array or object"
        )
    data: Any = list(args) if args else kwargs
    return json.dumps(data).encode(), {"Content-Type": "application/json"}


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        raise RemoteError(response.status_code, "unknown", response.text[:500]) from None
    raise RemoteError(response.status_code, error["code"], error["message"], error["request_id"])


def _result(response: httpx.Response) -> Any:
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.content
