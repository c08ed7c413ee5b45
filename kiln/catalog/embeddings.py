"""`TransformersEmbeddings`: a text encoder from the Hugging Face hub (or a local directory)
serving the embeddings task, each text's vector the mean of its token states, L2-normalised
(how sentence-transformers models such as all-MiniLM-L6-v2 are meant to be pooled). Such a
model's inputs are limited to the length it was trained for (its `sentence_bert_config.json`),
where sentence-transformers would cut them.

Requests a replica holds at the same time share forward passes: each call checks its own
inputs, then queues them; one batching task per replica takes everything queued, runs it
through the model in one pass (in a thread, so the event loop keeps serving) and hands each
call its own vectors. A call that fails its checks never reaches the queue, so it fails alone.
`batches` counts the forward passes.

`dimensions` keeps the first N components, renormalised (what Matryoshka-trained models are
made for). A text longer than the model reads is refused, never cut short.

This module imports neither torch nor transformers at the top: the router imports it to read the
class's specification.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import kiln
from kiln.catalog.text import context_length, require_model_id

if TYPE_CHECKING:
    import torch

__all__ = ["TransformersEmbeddings"]

# The fallback for a model whose configuration and tokenizer state no limit (BERT's).
_FALLBACK_MAX_LENGTH = 512


@dataclass
class _Queued:
    """One call's inputs, waiting for a forward pass."""

    inputs: list[list[int]]
    future: asyncio.Future[list[list[float]]] = field(repr=False)


class TransformersEmbeddings:
    """A text-embedding model serving `embeddings`. Subclass it with `model_id` set."""

    model_id: ClassVar[str] = ""
    # The most inputs one forward pass takes: a larger queue is run in several passes.
    max_batch: ClassVar[int] = 64

    # Set by `load` (kept in the snapshot).
    tokenizer: Any
    model: Any
    max_length: int
    dimensions: int
    # Set by `start`.
    batches: int  # forward passes run

    @kiln.enter(snap=True)
    def load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        require_model_id(self)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModel.from_pretrained(self.model_id, dtype="auto").to(device).eval()
        self.max_length = context_length(
            self.model.config, self.tokenizer, fallback=_FALLBACK_MAX_LENGTH
        )
        trained = _sentence_transformers_max_length(self.model_id)
        if trained is not None:
            self.max_length = min(self.max_length, trained)
        self.dimensions = int(self.model.config.hidden_size)

    @kiln.enter()
    def start(self) -> None:
        self.batches = 0
        # Made on the event loop by the first call (this hook runs in a thread).
        self._queue: asyncio.Queue[_Queued] | None = None
        self._batcher: asyncio.Task[None] | None = None

    @kiln.exit()
    async def stop(self) -> None:
        batcher: asyncio.Task[None] | None = getattr(self, "_batcher", None)  # no `start`: none
        if batcher is not None:
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher

    @kiln.method(task="embeddings")
    async def embed(self, request: kiln.EmbeddingsRequest) -> kiln.Embeddings:
        """One L2-normalised vector per text of `request.input`, in order."""
        size = self._checked_dimensions(request.dimensions)
        inputs = [self._encode(index, text) for index, text in enumerate(request.input)]
        if not inputs:
            return kiln.Embeddings(vectors=[], prompt_tokens=0)
        queued = _Queued(inputs, asyncio.get_running_loop().create_future())
        self._batch_queue().put_nowait(queued)
        vectors = await queued.future
        if size != self.dimensions:
            vectors = [_normalised(vector[:size]) for vector in vectors]
        return kiln.Embeddings(vectors=vectors, prompt_tokens=sum(len(ids) for ids in inputs))

    # Checks ------------------------------------------------------------------------------------

    def _checked_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.dimensions
        if not 1 <= dimensions <= self.dimensions:
            raise kiln.InvalidArguments(
                f"dimensions={dimensions} is not valid for this model: its vectors have "
                f"{self.dimensions} dimensions, so ask for 1 to {self.dimensions}.",
                param="dimensions",
            )
        return dimensions

    def _encode(self, index: int, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_length:
            raise kiln.InvalidArguments(
                f"input[{index}] is {len(ids)} tokens long, but this model reads at most "
                f"{self.max_length} tokens per input; shorten or split it.",
                param="input",
            )
        special = set(self.tokenizer.all_special_ids)  # [CLS], [SEP]: the tokenizer's own
        if all(token in special for token in ids):
            raise kiln.InvalidArguments(
                f"input[{index}] is empty: there is nothing to embed.", param="input"
            )
        return ids

    # Batching ----------------------------------------------------------------------------------

    def _batch_queue(self) -> asyncio.Queue[_Queued]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(
                self._batch_forever(self._queue), name="kiln-embeddings-batcher"
            )
        return self._queue

    async def _batch_forever(self, queue: asyncio.Queue[_Queued]) -> None:
        """Run whatever is queued, one pass after another, for as long as the replica lives."""
        while True:
            taken = [await queue.get()]
            while not queue.empty():
                taken.append(queue.get_nowait())
            waiting = [queued for queued in taken if not queued.future.done()]
            if not waiting:  # every caller went away
                continue
            try:
                vectors = await asyncio.to_thread(
                    self._forward, [ids for queued in waiting for ids in queued.inputs]
                )
            except Exception as exc:  # noqa: BLE001 - each caller gets the error, not the batcher
                for queued in waiting:
                    if not queued.future.done():
                        queued.future.set_exception(exc)
                continue
            start = 0
            for queued in waiting:
                end = start + len(queued.inputs)
                if not queued.future.done():
                    queued.future.set_result(vectors[start:end])
                start = end

    def _forward(self, inputs: list[list[int]]) -> list[list[float]]:
        """The normalised mean-pooled vectors of `inputs`, `max_batch` at a time, each pass
        padded to its longest input (shortest first, so little padding is run)."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        vectors: list[list[float]] = [[] for _ in inputs]
        for first in range(0, len(order), self.max_batch):
            chosen = order[first : first + self.max_batch]
            pooled = self._pass([inputs[i] for i in chosen])
            self.batches += 1
            for i, vector in zip(chosen, pooled.tolist(), strict=True):
                vectors[i] = vector
        return vectors

    def _pass(self, inputs: list[list[int]]) -> torch.Tensor:
        import torch

        device = self.model.device
        longest = max(len(ids) for ids in inputs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(inputs), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), longest), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(states.dtype)
        mean = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, dim=-1).cpu()


def _sentence_transformers_max_length(model_id: str) -> int | None:
    """The input length a sentence-transformers model was trained for (all-MiniLM-L6-v2: 256
    of BERT's 512 positions), from its `sentence_bert_config.json`, when it has one."""
    import json

    from transformers.utils.hub import cached_file

    try:
        path = cached_file(
            model_id, "sentence_bert_config.json", _raise_exceptions_for_missing_entries=False
        )
        if path is None:
            return None
        with open(path) as file:
            stated = json.load(file).get("max_seq_length")
    except (OSError, ValueError):
        return None
    return stated if isinstance(stated, int) and stated > 0 else None


def _normalised(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm > 0 else vector
