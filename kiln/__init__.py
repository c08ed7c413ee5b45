"""Kiln: serverless Python functions on GPUs, with hardware-speed cold starts.

This module is the public SDK surface:

    import kiln

    app = kiln.App("hello")

    @app.function(gpu="none")
    def shout(text: str) -> str:
        return text.upper() + "!"

It stays light: it imports neither torch nor any database or messaging driver.
"""

from kiln._version import __version__
from kiln.errors import InvalidArguments
from kiln.functions.app import App
from kiln.functions.hooks import enter, exit, method, websocket
from kiln.functions.session import Session, SessionClosed
from kiln.functions.tasks import (
    Audio,
    ChatRequest,
    CompletionRequest,
    Embeddings,
    EmbeddingsRequest,
    Finish,
    ImageRequest,
    Images,
    Message,
    Segment,
    SpeechRequest,
    Transcription,
    TranscriptionRequest,
)
from kiln.remote import Job, RemoteError, RemoteFunction, lookup

__all__ = [
    "App",
    "Audio",
    "ChatRequest",
    "CompletionRequest",
    "Embeddings",
    "EmbeddingsRequest",
    "Finish",
    "ImageRequest",
    "Images",
    "InvalidArguments",
    "Job",
    "Message",
    "RemoteError",
    "RemoteFunction",
    "Segment",
    "Session",
    "SessionClosed",
    "SpeechRequest",
    "Transcription",
    "TranscriptionRequest",
    "__version__",
    "enter",
    "exit",
    "lookup",
    "method",
    "websocket",
]
