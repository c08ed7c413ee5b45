"""Completion webhooks: a job's final state POSTed to the URL given at spawn, signed, and
retried with backoff until the receiver answers 2xx (or the attempts run out).

`Kiln-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" with KILN_WEBHOOK_SECRET>`;
a receiver recomputes it over the raw body and refuses old timestamps, as with Stripe's.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx

__all__ = ["MAX_ATTEMPTS", "deliver", "retry_delay_s", "sign"]

MAX_ATTEMPTS = 8
_TIMEOUT_S = 10.0


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def retry_delay_s(attempts: int) -> float:
    """The wait after the `attempts`-th failed delivery: 2, 4, 8 ... seconds, at most 5 min."""
    return float(min(300, 2**attempts))


async def deliver(
    client: httpx.AsyncClient, url: str, body: bytes, secret: str, call_id: str
) -> None:
    """POST one delivery; raises on anything but a 2xx answer."""
    response = await client.post(
        url,
        content=body,
        headers={
            "Content-Type": "application/json",
            "Kiln-Signature": sign(secret, body, int(time.time())),
            "Kiln-Webhook-Id": call_id,
            "User-Agent": "kiln-webhooks",
        },
        timeout=_TIMEOUT_S,
    )
    response.raise_for_status()
