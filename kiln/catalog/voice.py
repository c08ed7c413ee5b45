"""`VoiceAgent`: the catalog's `voice-agent`, a WebSocket speaking OpenAI's Realtime protocol
(`WS /v1/realtime?model=NAME`) with a speech recogniser, a chat model and a voice behind it,
all in one replica so that no stage waits on a network hop.

Its parts are the catalog's own engines, each with its model: `TransformersTranscription`
(`stt`), `TransformersText` (`chat`) and `TransformersSpeech` (`tts`), named in `model_id` as
`"stt=ID,chat=ID,tts=ID"` (a part left out gets its catalog entry's default model). `load`
loads the three into the snapshot; `start` loads Silero's voice activity model, small and kept
out of the snapshot (TorchScript modules do not pickle). Each session is a
`kiln.catalog.realtime.RealtimeSession`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import kiln
from kiln.catalog.speech import TransformersSpeech, TransformersTranscription
from kiln.catalog.text import PLAIN_CHAT_TEMPLATE, TransformersText
from kiln.errors import InvalidSpec

__all__ = ["PARTS", "VoiceAgent", "parts_of"]

PARTS = {
    "stt": "openai/whisper-large-v3-turbo",
    "chat": "Qwen/Qwen2.5-1.5B-Instruct",
    "tts": "facebook/mms-tts-eng",
}
_ANSWER_ROOM = 64  # tokens kept free for the answer when old turns must go


def parts_of(model_id: str) -> dict[str, str]:
    """The model of each part `model_id` names ("stt=...,chat=...,tts=..."), defaults filled
    in; `InvalidSpec` naming a part that does not exist."""
    parts = dict(PARTS)
    for piece in filter(None, (p.strip() for p in model_id.split(","))):
        name, sep, value = piece.partition("=")
        if not sep or name.strip() not in PARTS or not value.strip():
            raise InvalidSpec(
                f"voice-agent model {model_id!r} is not valid: write its parts as "
                "'stt=ID,chat=ID,tts=ID' (each a hub id or a model directory; a part left out "
                f"is its default: {', '.join(f'{k}={v}' for k, v in PARTS.items())})"
            )
        parts[name.strip()] = value.strip()
    return parts


def _engine(cls: type[Any], model_id: str) -> Any:
    engine = cls()
    engine.model_id = model_id  # on the instance: the class stays importable for the snapshot
    return engine


class VoiceAgent:
    """Speech in, speech out. Subclass it with `model_id` set (see `parts_of`)."""

    model_id: ClassVar[str] = ""
    # A session with no client event for this long is told so and closed.
    idle_timeout_s: ClassVar[float] = 120.0

    # Set by `load` (kept in the snapshot).
    stt: TransformersTranscription
    chat: TransformersText
    tts: TransformersSpeech
    # Set by `start`.
    vad_model: Any

    @kiln.enter(snap=True)
    def load(self) -> None:
        parts = parts_of(self.model_id)
        self.stt = _engine(TransformersTranscription, parts["stt"])
        self.chat = _engine(TransformersText, parts["chat"])
        self.tts = _engine(TransformersSpeech, parts["tts"])
        for engine in (self.stt, self.chat, self.tts):
            engine.load()

    @kiln.enter()
    def start(self) -> None:
        from kiln.catalog.realtime.vad import load_silero

        for engine in (self.stt, self.chat, self.tts):
            engine.start()
        self.vad_model = load_silero()

    @kiln.exit()
    def stop(self) -> None:
        self.chat.stop()

    @kiln.websocket(task="realtime")
    async def realtime(self, session: kiln.Session) -> None:
        """A voice conversation in OpenAI's Realtime protocol."""
        from kiln.catalog.realtime.session import RealtimeSession

        model = session.params.get("model", "")
        await RealtimeSession(self, session, model=model, idle_timeout_s=self.idle_timeout_s).run()

    def fit(self, instructions: str, history: list[kiln.Message]) -> tuple[kiln.Message, ...]:
        """The instructions and as much of the conversation, newest first, as the chat model's
        context holds with room left for the answer."""
        tokenizer = self.chat.tokenizer
        template = None if tokenizer.chat_template else PLAIN_CHAT_TEMPLATE
        room = min(_ANSWER_ROOM, self.chat.context // 4)
        kept = list(history)
        while True:
            messages = [kiln.Message(role="system", content=instructions), *kept]
            rendered = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                chat_template=template, add_generation_prompt=True, tokenize=False,
            )  # fmt: skip
            used = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
            if used + room <= self.chat.context or not kept:
                return tuple(messages)
            kept.pop(0)
