"""Calling deployed functions from any Python process: `fn.remote(...)`, `fn.spawn(...)`
(a `Job` with `.get(timeout)` and `.cancel()`) and `fn.remote_gen(...)`, on a decorated
function or on `kiln.lookup("APP/NAME")` (classes: "APP/Class.method").

The Kiln URL and API key come from `KILN_URL` and `KILN_API_KEY`, else `$KILN_HOME/config.toml`
(what `kiln dev` writes), or are given to `lookup`. Arguments travel as JSON (keyword
arguments as an object, positional ones as an array; a single `bytes` argument as the raw
body); an error answer is raised as `kiln.RemoteError` with the API's code and message.

The HTTP side is `kiln.client`, the same client the CLI uses; it is made on first use (so
`import kiln` stays light) and kept for the handle's later calls.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kiln.errors import RemoteError

if TYPE_CHECKING:
    import httpx

    from kiln.client import Client

__all__ = ["Job", "RemoteError", "RemoteFunction", "lookup"]

_FINISHED = ("succeeded", "failed", "cancelled", "expired")


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
        self._client: Client | None = None
        self._client_lock = threading.Lock()

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call it and return its result (bytes for a bytes result)."""
        content, headers = _body(args, kwargs)
        response = self.client().request(
            "POST", f"/v1/run/{self.target}", content=content, headers=headers
        )
        return _result(response)

    def remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Call a generator and yield its items as they arrive (bytes items as base64)."""
        content, headers = _body(args, kwargs)
        path = f"/v1/run/{self.target}"
        for item in self.client().stream_items("POST", path, content=content, headers=headers):
            if item.get("end"):
                return
            yield item["data"]

    def spawn(self, *args: Any, idempotency_key: str | None = None, **kwargs: Any) -> Job:
        """Start it as an async job; the `Job` says how it goes."""
        content, headers = _body(args, kwargs)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        response = self.client().request(
            "POST", f"/v1/spawn/{self.target}", content=content, headers=headers
        )
        return Job(response.json()["call_id"], self)

    def client(self) -> Client:
        """The handle's client, made on first use from lookup's url/api_key, else KILN_URL and
        KILN_API_KEY, else config.toml."""
        with self._client_lock:
            if self._client is None:
                from kiln.client import connect

                self._client = connect(
                    url=self._url, api_key=self._api_key, timeout_s=self._timeout_s
                )
                # Its connections close with the handle, not at interpreter exit.
                weakref.finalize(self, self._client.close)
            return self._client

    def __repr__(self) -> str:
        return f"<kiln remote function {self.target}>"


class Job:
    """An async job: `get()` waits for its result, `cancel()` stops it."""

    def __init__(self, call_id: str, function: RemoteFunction) -> None:
        self.call_id = call_id
        self._function = function

    def status(self) -> dict[str, Any]:
        view: dict[str, Any] = self._function.client().request("GET", self._path).json()
        return view

    def get(self, timeout: float | None = None) -> Any:
        """Wait (at most `timeout` seconds) for the job to finish; its result, or its error
        raised. TimeoutError if it is still going."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        client = self._function.client()
        while True:
            try:
                view = client.request("GET", self._path).json()
            except RemoteError as exc:
                if exc.http_status != 429:
                    raise
                # Polling counts against the rate limit too: wait as long as it says.
                wait = exc.retry_after if exc.retry_after is not None else 1.0
                if deadline is not None and time.monotonic() + wait > deadline:
                    raise TimeoutError(
                        f"job {self.call_id} is still running (rate-limited)"
                    ) from exc
                time.sleep(wait)
                continue
            if view["status"] == "succeeded":
                if "result" in view:
                    return view["result"]
                return _result(client.request("GET", view["result_url"]))
            if view["status"] in _FINISHED:
                error = view.get("error") or {"code": view["status"], "message": view["status"]}
                raise RemoteError(
                    status=200,
                    code=error["code"],
                    message=f"the job {view['status']}: {error['message']}",
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.call_id} is still {view['status']}")
            time.sleep(
                pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            )
            pause = min(1.0, pause * 1.5)

    def cancel(self) -> None:
        self._function.client().request("POST", f"{self._path}/cancel")

    @property
    def _path(self) -> str:
        return f"/v1/calls/{self.call_id}"

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


def _result(response: httpx.Response) -> Any:
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.content
