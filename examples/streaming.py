"""Streaming results: a generator's items reach the client as they are produced.

kiln deploy examples/streaming.py
kiln call streaming/tokens '{"text": "the quick brown fox"}' --stream
curl -N -H "Authorization: Bearer $KILN_API_KEY" -H "Accept: text/event-stream" \\
    -d '{"text": "the quick brown fox"}' $KILN_URL/v1/run/streaming/tokens
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import kiln

app = kiln.App("streaming")


@app.function(concurrency=8)
def tokens(text: str, delay_s: float = 0.05) -> Iterator[str]:
    """One word at a time, as a language model emits tokens."""
    for word in text.split():
        time.sleep(delay_s)
        yield word


@app.function(concurrency=8)
async def countdown(start: int = 5) -> AsyncIterator[dict[str, int]]:
    """Async generators stream too."""
    for n in range(start, -1, -1):
        yield {"n": n}
        await asyncio.sleep(0.1)
