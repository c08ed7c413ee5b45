"""vLLM as `TransformersText`'s engine, where vLLM is installed and a GPU is present: its async
engine batches every stream of the replica continuously, where transformers runs one
`generate()` per request.

vLLM's engine lives on an asyncio loop of its own, in a thread this module starts, and the
replica's call threads step each stream on it, one output per step, as they step the sync
generator `chat` or `complete` returns. The engine does the sampling, the penalties, the seed
and the stop sequences itself; this module only translates: the request into `SamplingParams`,
vLLM's outputs into the same text deltas and `kiln.Finish` the transformers engine sends.

The engine starts processes and threads, so it is made in the plain `@kiln.enter()` hook, never
kept in a snapshot; vLLM reads the weights itself. Only used on GPU hosts with vLLM installed:
written to vLLM's documented API (`AsyncLLMEngine`, `SamplingParams`, `TokensPrompt`,
`RequestOutputKind.DELTA`) and not exercised by the test suite, which has neither.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import kiln
from kiln.errors import InvalidSpec

__all__ = ["VllmEngine", "chosen"]

_T = TypeVar("_T")

# Starting the engine loads the weights and captures CUDA graphs: minutes for a large model.
_START_TIMEOUT_S = 1800.0
# Aborting a request, and stopping the engine, take a round trip to its process.
_ABORT_TIMEOUT_S = 30.0


def chosen(engine: str) -> bool:
    """Whether vLLM generates for an engine setting of "auto", "transformers" or "vllm"."""
    if engine == "transformers":
        return False
    usable = importlib.util.find_spec("vllm") is not None and _has_gpu()
    if engine == "vllm" and not usable:
        raise InvalidSpec(
            'engine="vllm" needs the vllm package and a CUDA GPU, and this replica lacks one; '
            'use engine="auto" to fall back to transformers.'
        )
    return usable


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class VllmEngine:
    """vLLM's `AsyncLLMEngine` for `model_id`, with a context of `context` tokens (the same
    limit `TransformersText` checks requests against)."""

    def __init__(self, model_id: str, *, context: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kiln-vllm", daemon=True
        )
        self._thread.start()
        self._engine: Any = self._run(self._create(model_id, context), _START_TIMEOUT_S)

    @staticmethod
    async def _create(model_id: str, context: int) -> Any:
        # Made on its loop: the engine binds its output handler to the loop it runs on.
        from vllm import (  # type: ignore[import-not-found, unused-ignore]
            AsyncEngineArgs,
            AsyncLLMEngine,
        )

        return AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(model=model_id, max_model_len=context)
        )

    def _run(self, coroutine: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def stream(
        self,
        prompt: list[int],
        request: kiln.ChatRequest | kiln.CompletionRequest,
        *,
        max_tokens: int,
    ) -> Iterator[str | kiln.Finish]:
        """The text after `prompt` (token ids), as deltas and a `kiln.Finish`. Closing the
        iterator aborts the request in the engine."""
        from vllm import (  # type: ignore[import-not-found, unused-ignore]
            SamplingParams,
            TokensPrompt,
        )
        from vllm.sampling_params import (  # type: ignore[import-not-found, unused-ignore]
            RequestOutputKind,
        )

        params = SamplingParams(
            n=1,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            max_tokens=max_tokens,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            output_kind=RequestOutputKind.DELTA,
        )
        outputs: AsyncIterator[Any] = self._engine.generate(
            TokensPrompt(prompt_token_ids=prompt), params, request_id=uuid.uuid4().hex
        )
        written = 0
        reason = "stop"
        try:
            while True:
                output = self._run(_next(outputs))
                if output is None:
                    break
                completion = output.outputs[0]
                written += len(completion.token_ids)
                if completion.text:
                    yield completion.text
                if output.finished and completion.finish_reason == "length":
                    reason = "length"
            yield kiln.Finish(
                reason="length" if reason == "length" else "stop",
                prompt_tokens=len(prompt),
                completion_tokens=written,
            )
        finally:
            # The engine aborts a request whose output generator is closed before its end.
            self._run(_close(outputs), _ABORT_TIMEOUT_S)

    def close(self) -> None:
        """Stop the engine and its loop."""
        try:
            self._engine.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_ABORT_TIMEOUT_S)


async def _next(outputs: AsyncIterator[Any]) -> Any:
    """The next output, or None at the end."""
    try:
        return await anext(outputs)
    except StopAsyncIteration:
        return None


async def _close(outputs: AsyncIterator[Any]) -> None:
    close = getattr(outputs, "aclose", None)
    if close is not None:
        await close()
