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
    ChatRequest,
    CompletionRequest,
    Embeddings,
    EmbeddingsRequest,
    Finish,
    ImageRequest,
    Images,
    Message,
)
from kiln.remote import Job, RemoteError, RemoteFunction, lookup

__all__ = [
    "App",
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
    "Session",
    "SessionClosed",
    "__version__",
    "enter",
    "exit",
    "lookup",
    "method",
    "websocket",
]
