"""`TransformersText`: a causal language model from the Hugging Face hub (or a local directory)
serving the chat and completions tasks, its text streamed as it is generated.

The class is a base: a catalog entry subclasses it with `model_id` set and registers the
subclass with `app.cls(...)`. `load`, an `@kiln.enter(snap=True)` hook, reads the tokenizer and
the model (onto the GPU when there is one) and the context size, so a snapshot keeps them;
`start`, a plain `@kiln.enter()` hook, makes what a snapshot cannot keep.

Each request is checked against the context before anything is generated: a prompt that fills
it, or a `max_tokens` that does not fit beside the prompt, is refused with `InvalidArguments`
naming the request field, never cut short. Without `max_tokens` the model writes until it ends
its reply or the context is full (finish reason "length").

Two engines: with vLLM installed and a GPU present, vLLM's async engine generates
(`kiln.catalog._vllm`); otherwise `model.generate()` in a thread per request
(`kiln.catalog._sampling`). Both send the same deltas and the same `kiln.Finish`.

This module imports neither torch nor transformers at the top: the router imports it to read the
class's specification.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import kiln
from kiln.errors import InvalidSpec

if TYPE_CHECKING:
    from kiln.catalog._sampling import Generation
    from kiln.catalog._vllm import VllmEngine

__all__ = ["TransformersText", "context_length", "require_model_id"]

_log = logging.getLogger("kiln.catalog")

_Stream = Generator[str | kiln.Finish, None, None]

# The context assumed when neither the model's configuration nor its tokenizer states one.
FALLBACK_CONTEXT = 2048
# How long a closed stream waits for its generate() thread to finish the step in progress.
_STOP_WAIT_S = 30.0
# For a tokenizer that has no chat template: a "role: content" line per message, then
# "assistant:" for the model to go on from.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def require_model_id(engine: object) -> str:
    """The engine's `model_id`; `InvalidSpec` when its class left it empty."""
    model_id: str = getattr(engine, "model_id", "")
    if not model_id:
        raise InvalidSpec(
            f"{type(engine).__name__}.model_id is empty: set it to a Hugging Face model id or a "
            "local model directory."
        )
    return model_id


def context_length(config: Any, tokenizer: Any, *, fallback: int = FALLBACK_CONTEXT) -> int:
    """The most tokens the model reads at once: the smallest of what its configuration and its
    tokenizer state (a tokenizer without a limit states 1e30), else `fallback`."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    stated = [
        value
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")
        if isinstance(value := getattr(text_config, name, None), int) and value > 0
    ]
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**9:
        stated.append(limit)
    return min(stated) if stated else fallback


@dataclass(frozen=True)
class _Prompt:
    """How errors name what the model was asked to read."""

    param: str  # the request field, as OpenAI names it
    subject: str  # "the prompt is"
    noun: str  # "the prompt"
    takes: str  # "the prompt takes"


_CHAT = _Prompt(
    param="messages",
    subject="the messages are",
    noun="the messages",
    takes="the messages take",
)
_COMPLETION = _Prompt(
    param="prompt", subject="the prompt is", noun="the prompt", takes="the prompt takes"
)


class TransformersText:
    """A text-generation model serving `chat` and `completions`. Subclass it with `model_id`
    set (a hub id or a local directory)."""

    model_id: ClassVar[str] = ""
    # "auto": vLLM when it is installed and a GPU is present, else transformers.
    engine: ClassVar[Literal["auto", "transformers", "vllm"]] = "auto"

    # Set by `load` (kept in the snapshot).
    tokenizer: Any
    model: Any  # None when vLLM generates
    context: int
    eos: list[int]
    pad: int | None
    uses_vllm: bool
    # Set by `start`.
    # A class default: the exit hook runs after a failed start too.
    vllm: VllmEngine | None = None
    generations: set[Generation]  # the generate() calls running now

    @kiln.enter(snap=True)
    def load(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from kiln.catalog import _vllm

        require_model_id(self)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        config = AutoConfig.from_pretrained(self.model_id)
        self.context = context_length(config, self.tokenizer)
        self.uses_vllm = _vllm.chosen(self.engine)
        self.model = None
        self.eos = _eos_ids(config, self.tokenizer)
        self.pad = self.tokenizer.pad_token_id
        if not self.uses_vllm:
            self.model = _load_model(self.model_id)
            self.eos = _eos_ids(self.model.generation_config, self.tokenizer) or self.eos

    @kiln.enter()
    def start(self) -> None:
        self.generations = set()
        self._generations_lock = threading.Lock()
        self.vllm = None
        if self.uses_vllm:
            from kiln.catalog._vllm import VllmEngine

            self.vllm = VllmEngine(self.model_id, context=self.context)

    @kiln.exit()
    def stop(self) -> None:
        if self.vllm is not None:
            self.vllm.close()

    @kiln.method(task="chat")
    def chat(self, request: kiln.ChatRequest) -> _Stream:
        """The reply to `request.messages`, rendered with the tokenizer's chat template (or
        `PLAIN_CHAT_TEMPLATE` when it has none), as text deltas and a `kiln.Finish`."""
        from jinja2 import TemplateError

        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        template = None if self.tokenizer.chat_template else PLAIN_CHAT_TEMPLATE
        try:
            rendered: str = self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as exc:  # a template's raise_exception(): roles out of order...
            raise kiln.InvalidArguments(
                f"this model's chat template does not accept the messages: {exc}",
                param="messages",
            ) from None
        # The template writes the special tokens it wants (a BOS, say): none are added.
        prompt = self._encode(rendered, special_tokens=False)
        yield from self._stream(prompt, request, _CHAT)

    @kiln.method(task="completions")
    def complete(self, request: kiln.CompletionRequest) -> _Stream:
        """What follows `request.prompt` (the prompt itself first, with `echo`), as text deltas
        and a `kiln.Finish`."""
        prompt = self._encode(request.prompt, special_tokens=True)
        echo = request.prompt if request.echo else ""
        yield from self._stream(prompt, request, _COMPLETION, echo=echo)

    # Generation -------------------------------------------------------------------------------

    def _encode(self, text: str, *, special_tokens: bool) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
        return ids

    def _room(self, prompt_tokens: int, max_tokens: int | None, prompt: _Prompt) -> int:
        """How many tokens to generate at most; raises when the request does not fit."""
        if prompt_tokens >= self.context:
            raise kiln.InvalidArguments(
                f"{prompt.subject} {prompt_tokens} tokens long, but this model's context is "
                f"{self.context} tokens and must keep room for at least one new token; "
                f"shorten {prompt.noun}.",
                param=prompt.param,
            )
        room = self.context - prompt_tokens
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise kiln.InvalidArguments(
                f"max_tokens={max_tokens} is not valid: ask for at least 1 token.",
                param="max_tokens",
            )
        if max_tokens > room:
            raise kiln.InvalidArguments(
                f"max_tokens={max_tokens} does not fit: {prompt.takes} {prompt_tokens} of this "
                f"model's {self.context} context tokens, so at most {room} new tokens fit; "
                f"lower max_tokens or shorten {prompt.noun}.",
                param="max_tokens",
            )
        return max_tokens

    def _stream(
        self,
        prompt: list[int],
        request: kiln.ChatRequest | kiln.CompletionRequest,
        kind: _Prompt,
        *,
        echo: str = "",
    ) -> _Stream:
        limit = self._room(len(prompt), request.max_tokens, kind)
        if echo:
            yield echo
        if self.vllm is not None:
            yield from self.vllm.stream(prompt, request, max_tokens=limit)
        else:
            yield from self._generate(prompt, request, limit)

    def _generate(
        self,
        prompt: list[int],
        request: kiln.ChatRequest | kiln.CompletionRequest,
        limit: int,
    ) -> _Stream:
        from kiln.catalog._sampling import (
            Detokenizer,
            Generation,
            Penalties,
            Sampler,
            StopScanner,
            generation_config,
        )

        processors: list[Any] = []
        if request.presence_penalty or request.frequency_penalty:
            processors.append(
                Penalties(
                    prompt_length=len(prompt),
                    presence=request.presence_penalty,
                    frequency=request.frequency_penalty,
                )
            )
        if request.temperature > 0:  # 0: greedy
            processors.append(
                Sampler(
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=request.seed,
                    device=self.model.device,
                )
            )
        generation = Generation(
            self.model,
            prompt,
            config=generation_config(max_new_tokens=limit, eos=self.eos, pad=self.pad),
            processors=processors,
        )
        text = Detokenizer(self.tokenizer)
        stops = StopScanner(request.stop)
        written = 0
        last: int | None = None
        with self._generations_lock:
            self.generations.add(generation)
        try:
            generation.start()
            for token in generation.tokens():
                written += 1
                last = token
                delta = stops.feed(text.feed(token))
                if delta:
                    yield delta
                if stops.hit:
                    break
            else:
                rest = stops.feed(text.flush())
                rest += "" if stops.hit else stops.flush()
                if rest:
                    yield rest
            self._end(generation)
            ended = stops.hit or last in self.eos or written < limit
            yield kiln.Finish(
                reason="stop" if ended else "length",
                prompt_tokens=len(prompt),
                completion_tokens=written,
            )
        finally:
            # Also when the caller went away (GeneratorExit here): generation stops after the
            # decoding step in progress instead of running on to the limit.
            self._end(generation)

    def _end(self, generation: Generation) -> None:
        if not generation.stop(_STOP_WAIT_S):
            _log.warning("a generate() thread still runs %s s after it was cancelled", _STOP_WAIT_S)
        with self._generations_lock:
            self.generations.discard(generation)


def _load_model(model_id: str) -> Any:
    """The model in its checkpoint's dtype, on the GPU when there is one, for inference."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
    return model.to(device).eval()


def _eos_ids(config: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the configuration's (one id or several), else the
    tokenizer's."""
    stated = getattr(config, "eos_token_id", None)
    if stated is None:
        stated = tokenizer.eos_token_id
    if stated is None:
        return []
    return [stated] if isinstance(stated, int) else [int(token) for token in stated]
