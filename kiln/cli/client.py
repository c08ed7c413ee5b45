"""The CLI's HTTP client for the control and customer APIs: the URL and key come from
Settings (env first, then config.toml), errors come back in Kiln's one shape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from kiln.errors import ConfigError, KilnError, Unavailable
from kiln.settings import Settings

__all__ = ["ApiClient", "ApiError"]


class ApiError(KilnError):
    """An error answer from the API, carried to the command line with its status and code."""

    def __init__(self, status: int, code: str, message: str, request_id: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status}, request {request_id})")
        self.http_status = status
        self.api_code = code


class ApiClient:
    def __init__(self, settings: Settings, timeout_s: float = 600.0) -> None:
        if not settings.url or not settings.api_key:
            raise ConfigError(
                [
                    "no Kiln to talk to: start `kiln dev` (it writes the URL and a key to "
                    f"{settings.config_file}), or set KILN_URL and KILN_API_KEY"
                ]
            )
        self.url = settings.url
        self._client = httpx.Client(
            base_url=settings.url,
            headers={"Authorization": f"Bearer {settings.api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=settings.connect_timeout_s),
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(
                f"cannot reach Kiln at {self.url} ({exc}); is `kiln dev` running?"
            ) from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    def stream_lines(self, method: str, path: str, **kwargs: Any) -> Iterator[str]:
        """The lines of a streamed (NDJSON) answer, as they arrive."""
        headers = {**kwargs.pop("headers", {}), "Accept": "application/x-ndjson"}
        try:
            with self._client.stream(method, path, headers=headers, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                yield from (line for line in response.iter_lines() if line)
        except httpx.TransportError as exc:
            raise Unavailable(
                f"cannot reach Kiln at {self.url} ({exc}); is `kiln dev` running?"
            ) from exc


def _error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, error["code"], error["message"], error["request_id"])
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "unknown", response.text[:500], "-")
