"""How `TransformersText` turns a request into text with `model.generate()`: the sampling
options OpenAI names as logits processors, a `generate()` call in a thread of its own that hands
over its tokens as they come and stops within one decoding step of being cancelled, and the
text made from those tokens (decoded incrementally, with the stop sequences cut out).

Sampling is done by `Sampler`, not by `generate(do_sample=True)`: generate draws from torch's
global random generator, which every stream in the process shares, so a seed could not make one
stream reproducible while others run. `Sampler` draws each token with the request's own
`torch.Generator` and leaves that token the only possible one, so generate's greedy choice
takes it: concurrent streams neither take a lock nor disturb each other's draws.

Imported by the engine's methods on a replica, never by `import kiln.catalog.text`, so it may
import torch and transformers at the top.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch  # noqa: TID253 - see the module docstring
from transformers import (  # noqa: TID253
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer  # noqa: TID253

__all__ = [
    "Cancel",
    "Detokenizer",
    "Generation",
    "Penalties",
    "Sampler",
    "StopScanner",
    "generation_config",
]


class Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the tokens generated so far (the prompt
    is not counted): `logit[t] -= presence * (count[t] > 0) + frequency * count[t]`."""

    def __init__(self, *, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class Sampler(LogitsProcessor):
    """Draws the next token at `temperature`, from the smallest set of tokens whose probability
    reaches `top_p`, with a generator of its own (seeded with `seed` when given), and returns
    scores that allow only that token. Last in the list: it samples what the others left."""

    def __init__(
        self, *, temperature: float, top_p: float, seed: int | None, device: torch.device
    ) -> None:
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()  # a fresh seed from the OS
        else:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        warped = self.warpers(cast(torch.LongTensor, input_ids), scores.float())
        probabilities = torch.softmax(warped, dim=-1)
        chosen = torch.multinomial(probabilities, num_samples=1, generator=self.generator)
        only = torch.full_like(scores, -float("inf"))
        return only.scatter_(1, chosen, 0.0)


class Cancel(StoppingCriteria):
    """Stops `generate()` at the end of the decoding step in which `event` is set. `steps`
    counts the steps it was asked about."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        stop = torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )
        return stop  # type: ignore[return-value]  # a bool tensor is what BoolTensor means


_END = None


class _TokenQueue(BaseStreamer):
    """generate()'s streamer: hands each new token to the thread reading the queue. generate
    puts the prompt first, which is skipped."""

    def __init__(self, tokens: queue.SimpleQueue[list[int] | BaseException | None]) -> None:
        self.tokens = tokens
        self.prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass  # the thread's `finally` marks the end, after an error too


class Generation:
    """One `model.generate()` in a thread of its own; `tokens()` yields its tokens as they are
    made, `stop()` cancels it and waits for the thread."""

    def __init__(
        self,
        model: Any,
        prompt: list[int],
        *,
        config: GenerationConfig,
        processors: list[LogitsProcessor],
    ) -> None:
        self.cancel = Cancel()
        self._queue: queue.SimpleQueue[list[int] | BaseException | None] = queue.SimpleQueue()
        self._arguments: dict[str, Any] = {
            "inputs": torch.tensor([prompt], device=model.device),
            "attention_mask": torch.ones((1, len(prompt)), dtype=torch.long, device=model.device),
            "generation_config": config,
            "logits_processor": LogitsProcessorList(processors),
            "stopping_criteria": StoppingCriteriaList([self.cancel]),
            "streamer": _TokenQueue(self._queue),
        }
        self._model = model
        self._thread = threading.Thread(target=self._run, name="kiln-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._model.generate(**self._arguments)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            self._queue.put(exc)
        finally:
            self._queue.put(_END)

    def tokens(self) -> Iterator[int]:
        """The generated tokens, as they come. The thread always ends the queue (its `finally`),
        so the wait for the next token is bounded by the next decoding step."""
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Cancel generation (it ends after the decoding step in progress) and wait up to
        `timeout_s` for the thread; whether it ended."""
        self.cancel.event.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()


def generation_config(*, max_new_tokens: int, eos: list[int], pad: int | None) -> GenerationConfig:
    """Greedy decoding of at most `max_new_tokens` (a `Sampler` makes it sampling). The options
    OpenAI's API has no word for are set to their neutral values, so that a model's own
    `generation_config.json` (a repetition penalty, say) does not change what a request asks
    for."""
    return GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=eos,
        pad_token_id=eos[0] if pad is None and eos else pad,
    )


class Detokenizer:
    """Text from tokens as they come, each token decoded once with a few before it for context
    (the way TGI and vLLM do it): a token that ends inside a character (an incomplete UTF-8
    sequence decodes to U+FFFD) waits for the next one. Special tokens are left out."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # where the context of the text not yet returned starts
        self.read = 0  # where the text not yet returned starts

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text

    def feed(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What the last tokens hold back, once no more will come."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopScanner:
    """Cuts the text at the first stop sequence. Text that could be the start of one is held
    back until the next piece shows whether it is; `hit` says a stop sequence was found (the
    text after it, and the sequence itself, are never returned)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else text
        held = self.held + text
        found = [at for at in (held.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.hit = True
            self.held = ""
            return held[: min(found)]
        keep = self._partial(held)
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text

    def _partial(self, text: str) -> int:
        """The length of the longest end of `text` that a stop sequence starts with."""
        longest = max(len(stop) for stop in self.stops) - 1
        for length in range(min(len(text), longest), 0, -1):
            if any(stop.startswith(text[-length:]) for stop in self.stops):
                return length
        return 0
