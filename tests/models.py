"""The tiny offline models of `kiln.catalog.tiny`, under the name the tests import."""

from kiln.catalog.tiny import (
    CHAT_CONTEXT,
    CHAT_TEMPLATE,
    EMBEDDING_MAX_LENGTH,
    tiny_chat_model,
    tiny_embedding_model,
    tiny_image_pipeline,
)

__all__ = [
    "CHAT_CONTEXT",
    "CHAT_TEMPLATE",
    "EMBEDDING_MAX_LENGTH",
    "tiny_chat_model",
    "tiny_embedding_model",
    "tiny_image_pipeline",
]
