"""The catalog's speech engines, through transformers:

- `TransformersTranscription`: a Whisper-family model (`AutoModelForSpeechSeq2Seq`) serving the
  transcription task. A recording is decoded to 16 kHz mono (`kiln.functions.audio_codec`), cut
  at its pauses into pieces of at most 30 s (`kiln.catalog._pauses`), and the pieces are read
  in one batch; each piece is a segment with its start and end. `recognise` is the same model
  on one piece, for the real-time voice agent.
- `TransformersSpeech`: a text-to-waveform model (VITS, as Meta's MMS voices; any
  `AutoModelForTextToWaveform` that returns `waveform`) serving the speech task. The text is
  cut into phrases (`kiln.catalog._phrases`) and each phrase's audio is yielded as soon as it
  is made, so the first bytes leave while the rest is still being synthesised.

Both load in an `@kiln.enter(snap=True)` hook (in half precision on a GPU), so a snapshot keeps
them. Neither module-level import pulls torch or transformers: the router imports this module
to read the classes' specifications.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import kiln
from kiln.catalog._phrases import phrases
from kiln.catalog.text import require_model_id

__all__ = ["OPENAI_VOICES", "TransformersSpeech", "TransformersTranscription"]

# The voices OpenAI's speech API names; a single-voice model answers to all of them.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
    "sage", "shimmer", "verse",
)  # fmt: skip
RECOGNISER_RATE = 16_000  # what Whisper's feature extractor reads
_PROMPT_TOKENS = 223  # Whisper reads at most this much of a prompt (half its context)


def _device_and_dtype() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def _fold_parametrizations(model: Any) -> None:
    """Compute parametrized weights once (VITS's vocoder keeps its convolutions under weight
    norm) and keep the results as plain parameters: the same outputs for inference, and a model
    a snapshot can hold (parametrized modules do not pickle)."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        for name in list(getattr(module, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        # weight_norm also leaves a hook for loading old checkpoints: a local function.
        hooks = module._load_state_dict_pre_hooks
        for key, hook in list(hooks.items()):
            name = getattr(getattr(hook, "hook", hook), "__qualname__", "")
            if "_weight_norm_compat_hook" in name:
                del hooks[key]


class TransformersTranscription:
    """A Whisper-family speech recogniser serving `transcription`. Subclass it with `model_id`
    set."""

    model_id: ClassVar[str] = ""

    # Set by `load` (kept in the snapshot).
    processor: Any
    model: Any
    languages: dict[str, int]  # "en" -> the token id of <|en|>
    max_new_tokens: int
    # Set by `start`.
    _turns: threading.Lock

    @kiln.enter(snap=True)
    def load(self) -> None:
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        model_id = require_model_id(self)
        device, dtype = _device_and_dtype()
        self.processor = AutoProcessor.from_pretrained(model_id)  # type: ignore[no-untyped-call]
        self.model = (
            AutoModelForSpeechSeq2Seq.from_pretrained(model_id, dtype=dtype).to(device).eval()
        )
        generation = self.model.generation_config
        self.languages = {
            token.strip("<|>"): index
            for token, index in (getattr(generation, "lang_to_id", None) or {}).items()
        }
        # The decoder's context less the forced start, language, task and timestamp tokens.
        self.max_new_tokens = max(1, int(self.model.config.max_target_positions) - 4)

    @kiln.enter()
    def start(self) -> None:
        self._turns = threading.Lock()

    @kiln.method(task="transcription")
    def transcribe(self, request: kiln.TranscriptionRequest) -> kiln.Transcription:
        """The text of `request.file`, with a segment per stretch of speech."""
        import numpy as np

        from kiln.catalog._pauses import speech_pieces
        from kiln.functions.audio_codec import decode

        language = self.language_of(request.language)
        pcm = decode(request.file, sample_rate=RECOGNISER_RATE, filename=request.filename)
        samples = np.frombuffer(pcm.data, dtype="<i2").astype(np.float32) / 32768.0
        pieces = speech_pieces(samples, RECOGNISER_RATE)
        if language is None and pieces and self.languages:
            # Once for the whole recording (from its first piece), so that every piece is read
            # in the same language and the answer can say which.
            language = self.detect_language(samples[pieces[0][0] : pieces[0][1]])
        texts = self.recognise_batch(
            [samples[a:b] for a, b in pieces],
            language=language,
            prompt=request.prompt,
            temperature=request.temperature,
        )
        segments = [
            kiln.Segment(start=a / RECOGNISER_RATE, end=b / RECOGNISER_RATE, text=text)
            for (a, b), text in zip(pieces, texts, strict=True)
            if text
        ]
        return kiln.Transcription(
            text=" ".join(s.text for s in segments),
            language=language or "",
            duration_s=pcm.duration_s,
            segments=segments,
        )

    def language_of(self, language: str | None) -> str | None:
        """`language` checked against the model's; None lets the model detect it."""
        if not language:
            return None
        code = language.strip().lower()
        if self.languages and code not in self.languages:
            raise kiln.InvalidArguments(
                f"language={language!r} is not one this model knows; it knows "
                f"{', '.join(sorted(self.languages))}",
                param="language",
            )
        return code

    def detect_language(self, samples: Any) -> str:
        """The language Whisper hears in a piece of speech (float32 at 16 kHz), by its code."""
        import torch

        model = self.model
        features = self.processor(
            samples, sampling_rate=RECOGNISER_RATE, return_tensors="pt"
        ).input_features.to(model.device, model.dtype)
        with self._turns, torch.inference_mode():
            token = int(model.detect_language(features)[0])
        codes = {index: code for code, index in self.languages.items()}
        return codes.get(token, "")

    def recognise(self, samples: Any, *, language: str | None = None, prompt: str = "") -> str:
        """The text of one piece of speech (float32 at 16 kHz, at most 30 s)."""
        return self.recognise_batch([samples], language=language, prompt=prompt)[0]

    def recognise_batch(
        self,
        pieces: list[Any],
        *,
        language: str | None = None,
        prompt: str = "",
        temperature: float = 0.0,
    ) -> list[str]:
        import torch

        if not pieces:
            return []
        model = self.model
        features = self.processor(
            pieces, sampling_rate=RECOGNISER_RATE, return_tensors="pt"
        ).input_features.to(model.device, model.dtype)
        options: dict[str, Any] = {"task": "transcribe", "max_new_tokens": self.max_new_tokens}
        if self.languages:
            options["language"] = language  # None: Whisper detects it
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature)
        if prompt:
            ids = self.processor.get_prompt_ids(prompt, return_tensors="pt")
            ids = ids[-_PROMPT_TOKENS:].to(model.device)
            options["prompt_ids"] = ids
            options["max_new_tokens"] = max(1, self.max_new_tokens - len(ids))
        with self._turns, torch.inference_mode():
            tokens = model.generate(features, **options)
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        if prompt:  # some versions return the prompt with the text
            texts = [t.removeprefix(" " + prompt).removeprefix(prompt) for t in texts]
        return [str(text).strip() for text in texts]


class TransformersSpeech:
    """A text-to-speech model serving `speech`, phrase by phrase. Subclass it with `model_id`
    set."""

    model_id: ClassVar[str] = ""

    # Set by `load` (kept in the snapshot).
    tokenizer: Any
    model: Any
    sample_rate: int
    speakers: int
    # Set by `start`.
    _turns: threading.Lock

    @kiln.enter(snap=True)
    def load(self) -> None:
        from transformers import AutoModelForTextToWaveform, AutoTokenizer

        model_id = require_model_id(self)
        device, _ = _device_and_dtype()
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        # In float32 on a GPU too: the voices are small, and VITS's flows lose too much in half.
        self.model = AutoModelForTextToWaveform.from_pretrained(model_id).to(device).eval()
        _fold_parametrizations(self.model)
        config = self.model.config
        self.sample_rate = int(getattr(config, "sampling_rate", 16_000))
        self.speakers = int(getattr(config, "num_speakers", 1) or 1)

    @kiln.enter()
    def start(self) -> None:
        self._turns = threading.Lock()

    def voices(self) -> list[str]:
        """The names `voice` may take: OpenAI's, and speaker_N for a model of several."""
        return [*OPENAI_VOICES, "default", *(f"speaker_{i}" for i in range(self.speakers))]

    def speaker_of(self, voice: str) -> int | None:
        """The speaker index `voice` names (None for a single-voice model)."""
        name = voice.strip().lower()
        if name.startswith("speaker_") and name[8:].isdigit() and int(name[8:]) < self.speakers:
            index = int(name[8:])
        elif name in OPENAI_VOICES or name == "default":
            index = (OPENAI_VOICES.index(name) + 1 if name in OPENAI_VOICES else 0) % max(
                1, self.speakers
            )
        else:
            shown = self.voices()
            raise kiln.InvalidArguments(
                f"voice={voice!r} is not a voice of this model; its voices are "
                f"{', '.join(shown[:20])}{' ...' if len(shown) > 20 else ''}",
                param="voice",
            )
        return index if self.speakers > 1 else None

    @kiln.method(task="speech")
    def speak(self, request: kiln.SpeechRequest) -> Iterator[kiln.Audio]:
        """`request.input` spoken, one phrase at a time."""
        speaker = self.speaker_of(request.voice)
        for phrase in phrases(request.input):
            yield self.synthesise(phrase, speaker=speaker, speed=request.speed)

    def synthesise(
        self, text: str, *, speaker: int | None = None, speed: float = 1.0
    ) -> kiln.Audio:
        """One phrase as PCM16 mono at the model's rate."""
        import torch

        inputs = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        if inputs["input_ids"].shape[-1] == 0:  # nothing the vocabulary can say
            return kiln.Audio(pcm=b"", sample_rate=self.sample_rate)
        options: dict[str, Any] = {}
        if speaker is not None:
            options["speaker_id"] = speaker
        with self._turns, torch.inference_mode():
            rate = getattr(self.model, "speaking_rate", None)
            if rate is not None:
                self.model.speaking_rate = speed
            try:
                waveform = self.model(**inputs, **options).waveform[0]
            finally:
                if rate is not None:
                    self.model.speaking_rate = rate
        pcm = (waveform.float().clamp(-1.0, 1.0) * 32767.0).to(torch.int16).cpu().numpy()
        return kiln.Audio(pcm=pcm.astype("<i2").tobytes(), sample_rate=self.sample_rate)
