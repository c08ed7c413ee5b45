"""Publishing into a JetStream stream so that a leader election or a reconnect does not lose
the message. What the streams and buckets are is declared in kiln/streams.py."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from kiln._nats import reconnect_delay
from kiln.streams import PUBLISH_RETRY_S

__all__ = [
    "MSG_ID",
    "PUBLISH_RETRY_S",
    "RETRYABLE_PUBLISH_ERRORS",
    "publish_durably",
]

MSG_ID = "Nats-Msg-Id"
_ATTEMPT_TIMEOUT_S = 2.0
# What JetStream says (or does not) while a stream has no leader or the link is coming back.
RETRYABLE_PUBLISH_ERRORS: tuple[type[Exception], ...] = (
    NoStreamResponseError,
    ServiceUnavailableError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


async def publish_durably(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    *,
    headers: dict[str, Any],
    within_s: float = PUBLISH_RETRY_S,
) -> PubAck:
    """Publish into a stream and wait for it to confirm, retrying what a leader election or a
    reconnect answers (no responders, 503, no answer) for `within_s`, then raising the last
    error. `headers` must carry the message's id (`Nats-Msg-Id`): a retry of a publish that was
    in fact stored is then dropped by the stream as a duplicate."""
    if MSG_ID not in headers:
        raise ValueError(f"publish_durably needs a {MSG_ID} header, so retries deduplicate")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    attempt = 0
    while True:
        left = deadline - loop.time()
        try:
            return await js.publish(
                subject, payload, headers=headers, timeout=max(0.1, min(_ATTEMPT_TIMEOUT_S, left))
            )
        except RETRYABLE_PUBLISH_ERRORS:
            pause = reconnect_delay(attempt)
            if loop.time() + pause >= deadline:
                raise
            await asyncio.sleep(pause)
            attempt += 1
