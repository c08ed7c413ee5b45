"""The one client of Kiln's HTTP API, shared by the `kiln` command and the SDK's remote calls.

Where it points, first found wins: the `url` and `api_key` a caller passes (`kiln.lookup`),
`KILN_URL` and `KILN_API_KEY`, then `$KILN_HOME/config.toml` (what `kiln dev` writes). Every
error answer is raised as `kiln.errors.RemoteError` with the API's status, code and message.

httpx is imported when the first client is made, so `import kiln` stays light; nothing here
imports the CLI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from kiln.config_file import apply_client_config
from kiln.errors import ConfigError, RemoteError, Unavailable
from kiln.settings import Settings

if TYPE_CHECKING:
    import httpx
    from websockets.sync.client import ClientConnection

__all__ = ["Client", "client_settings", "connect"]


def client_settings(settings: Settings | None = None) -> Settings:
    """`settings` (by default the environment's) with config.toml filling what it left unset.

    A process that only calls Kiln (a script using the SDK) has no other entry point, so this
    is where the SDK reads the environment; the CLI passes the Settings it built itself.
    """
    if settings is None:
        settings = Settings.from_env(os.environ)
    return apply_client_config(settings)


def connect(
    *,
    url: str | None = None,
    api_key: str | None = None,
    settings: Settings | None = None,
    timeout_s: float = 600.0,
) -> Client:
    """A client for the Kiln that `url`/`api_key`, else the environment, else config.toml,
    names. Settings are read only for what the caller did not give."""
    connect_timeout_s = Settings.connect_timeout_s
    if url is None or api_key is None:
        resolved = client_settings(settings)
        url, api_key = url or resolved.url, api_key or resolved.api_key
        connect_timeout_s = resolved.connect_timeout_s
        config_file = resolved.config_file
    else:
        config_file = None
    if not url or not api_key:
        where = f" (it writes the URL and a key to {config_file})" if config_file else ""
        raise ConfigError(
            [
                f"no Kiln to talk to: start `kiln dev`{where}, or set KILN_URL and "
                "KILN_API_KEY (from Python, kiln.lookup also takes url= and api_key=)"
            ]
        )
    return Client(
        url=url, api_key=api_key, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s
    )


class Client:
    """One HTTP session with one Kiln. Use it as a context manager, or keep it and `close()`."""

    def __init__(
        self, *, url: str, api_key: str, timeout_s: float, connect_timeout_s: float
    ) -> None:
        import httpx

        self.url = url
        self._http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to one request; an error answer raises RemoteError."""
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    def stream_items(self, method: str, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The items of a streamed (NDJSON) answer as they arrive. An error item, which the
        router sends when a stream fails after it began, raises RemoteError."""
        import httpx

        headers = {**kwargs.pop("headers", {}), "Accept": "application/x-ndjson"}
        try:
            with self._http.stream(method, path, headers=headers, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for line in response.iter_lines():
                    if not line:
                        continue
                    item: dict[str, Any] = json.loads(line)
                    if "error" in item:
                        raise _remote_error(200, item["error"])
                    yield item
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def websocket(self, path: str, params: Mapping[str, str]) -> ClientConnection:
        """A WebSocket session at `path` (such as a pod's terminal), open once the server
        accepted it; a refusal raises RemoteError like any answer."""
        from urllib.parse import urlencode

        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect as open_websocket

        base = self.url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        url = f"{base}{path}?{urlencode(dict(params))}" if params else f"{base}{path}"
        try:
            return open_websocket(
                url,
                additional_headers={"Authorization": self._http.headers["Authorization"]},
                open_timeout=self._http.timeout.read,
                max_size=None,
                # No per-message deflate: a terminal's keystrokes gain nothing from it, and a
                # tunnel's bytes (often compressed already) would be squeezed at tens of MB/s.
                compression=None,
            )
        except InvalidStatus as exc:
            response = exc.response
            try:
                error = json.loads(response.body or b"{}")["error"]
                raise _remote_error(response.status_code, error) from None
            except (ValueError, KeyError, TypeError):
                raise RemoteError(
                    status=response.status_code, code="unknown",
                    message=(response.body or b"").decode(errors="replace")[:500],
                ) from None  # fmt: skip
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(f"cannot reach Kiln at {self.url} ({exc}); is `kiln dev` running?")


def _error(response: httpx.Response) -> RemoteError:
    retry_after = response.headers.get("retry-after")
    try:
        error = response.json()["error"]
        return _remote_error(response.status_code, error, retry_after)
    except (ValueError, KeyError, TypeError):
        return RemoteError(status=response.status_code, code="unknown", message=response.text[:500])


def _remote_error(
    status: int, error: dict[str, Any], retry_after: str | None = None
) -> RemoteError:
    try:
        wait = float(retry_after) if retry_after is not None else None
    except ValueError:
        wait = None
    return RemoteError(
        status=status,
        code=error["code"],
        message=error["message"],
        request_id=error.get("request_id", "-"),
        retry_after=wait,
    )
