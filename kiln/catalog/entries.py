"""The catalog's entries: what each deploys, with which model by default, on which GPUs it fits
and an example request. The one place these facts live (`GET /v1/catalog`, `kiln catalog list`
and the deploy path read them here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.catalog.voice import PARTS
from kiln.errors import NotFound
from kiln.functions.tasks import Task
from kiln.gpus import GPUS

__all__ = ["ENTRIES", "Entry", "entry"]


@dataclass(frozen=True, kw_only=True)
class Entry:
    slug: str
    title: str
    task: Task  # what the deployment is called for first
    tasks: tuple[Task, ...]  # every task its class serves
    engine: str  # "module:Class" of the engine class the deployment subclasses
    class_name: str  # the deployed class's name: APP/<class_name>.<method>
    default_model: str  # a Hugging Face hub id
    # GPU memory the default model needs, weights and working room (GB); 0: it runs on CPU.
    memory_gb: float
    default_gpu: str
    concurrency: int  # calls one replica holds at once
    example: Mapping[str, Any] = field(default_factory=dict)  # route and body

    def gpus_that_fit(self) -> list[str]:
        fitting = [gpu.name for gpu in GPUS if gpu.memory_gb >= self.memory_gb]
        return (["none"] if self.memory_gb == 0 else []) + fitting


ENTRIES: dict[str, Entry] = {
    e.slug: e
    for e in (
        Entry(
            slug="chat",
            title="Chat with an instruction-tuned language model",
            task=Task.CHAT,
            tasks=(Task.CHAT, Task.COMPLETIONS),
            engine="kiln.catalog.text:TransformersText",
            class_name="Chat",
            default_model="Qwen/Qwen2.5-1.5B-Instruct",
            memory_gb=8,
            default_gpu="L4",
            concurrency=8,
            example={
                "route": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "Say hello in French."}]},
            },
        ),
        Entry(
            slug="completions",
            title="Complete text with a base language model",
            task=Task.COMPLETIONS,
            tasks=(Task.COMPLETIONS, Task.CHAT),
            engine="kiln.catalog.text:TransformersText",
            class_name="Completions",
            default_model="Qwen/Qwen2.5-1.5B",
            memory_gb=8,
            default_gpu="L4",
            concurrency=8,
            example={
                "route": "/v1/completions",
                "body": {"prompt": "The three primary colours are", "max_tokens": 20},
            },
        ),
        Entry(
            slug="embeddings",
            title="Sentence embeddings for search and clustering",
            task=Task.EMBEDDINGS,
            tasks=(Task.EMBEDDINGS,),
            engine="kiln.catalog.embeddings:TransformersEmbeddings",
            class_name="Embeddings",
            default_model="sentence-transformers/all-MiniLM-L6-v2",
            memory_gb=0,
            default_gpu="none",
            concurrency=32,
            example={
                "route": "/v1/embeddings",
                "body": {"input": ["the first text", "the second text"]},
            },
        ),
        Entry(
            slug="image",
            title="Generate images from a text prompt (SDXL Turbo)",
            task=Task.IMAGE,
            tasks=(Task.IMAGE,),
            engine="kiln.catalog.image:DiffusersImage",
            class_name="Image",
            default_model="stabilityai/sdxl-turbo",
            memory_gb=16,
            default_gpu="L4",
            concurrency=1,
            example={
                "route": "/v1/images/generations",
                "body": {"prompt": "a lighthouse at dawn, watercolour", "size": "512x512"},
            },
        ),
        Entry(
            slug="stt",
            title="Transcribe speech to text (Whisper)",
            task=Task.TRANSCRIPTION,
            tasks=(Task.TRANSCRIPTION,),
            engine="kiln.catalog.speech:TransformersTranscription",
            class_name="Transcriber",
            default_model="openai/whisper-large-v3-turbo",
            memory_gb=4,
            default_gpu="L4",
            concurrency=4,
            example={
                "route": "/v1/audio/transcriptions",
                "body": {"file": "@speech.wav", "response_format": "verbose_json"},
            },
        ),
        Entry(
            slug="tts",
            title="Speak text aloud, streamed phrase by phrase (MMS VITS voices)",
            task=Task.SPEECH,
            tasks=(Task.SPEECH,),
            engine="kiln.catalog.speech:TransformersSpeech",
            class_name="Speaker",
            default_model="facebook/mms-tts-eng",
            memory_gb=2,
            default_gpu="L4",
            concurrency=4,
            example={
                "route": "/v1/audio/speech",
                "body": {"input": "Hello from Kiln.", "voice": "alloy", "response_format": "wav"},
            },
        ),
        Entry(
            slug="voice-agent",
            title="A voice agent over OpenAI's Realtime protocol (VAD, Whisper, chat, voice)",
            task=Task.REALTIME,
            tasks=(Task.REALTIME,),
            engine="kiln.catalog.voice:VoiceAgent",
            class_name="VoiceAgent",
            default_model=",".join(f"{part}={model}" for part, model in PARTS.items()),
            memory_gb=16,
            default_gpu="L4",
            concurrency=4,
            example={
                "route": "WS /v1/realtime",
                "body": {
                    "type": "session.update",
                    "session": {"audio": {"output": {"voice": "alloy"}}},
                },
            },
        ),
    )
}


def entry(slug: str) -> Entry:
    """The entry `slug`; `NotFound` names the ones there are."""
    found = ENTRIES.get(slug)
    if found is None:
        raise NotFound(
            f"the catalog has no entry {slug!r}; its entries are {', '.join(ENTRIES)}",
            param="catalog",
        )
    return found
