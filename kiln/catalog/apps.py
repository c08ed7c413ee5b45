"""A catalog deployment as an ordinary app: one generated file that subclasses the entry's
engine with the chosen model, and the deploy request made from it.

The file is the whole app (`APP_FILE`):

    from kiln.catalog.apps import catalog_app

    app = catalog_app("chat", name="qwen", model="Qwen/Qwen2.5-1.5B-Instruct", gpu="L4", ...)

Its replicas import it like any app file; the router builds the same app in-process to read its
specification. The same choices give the same file, so deploying them again changes nothing.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import Any

from kiln.catalog.entries import Entry, entry
from kiln.errors import InvalidRequest
from kiln.functions.app import App
from kiln.functions.package import archive_of

__all__ = ["APP_FILE", "CatalogChoice", "app_source", "catalog_app"]

APP_FILE = "app.py"
_MAX_MODEL_CHARS = 512


@dataclass(frozen=True, kw_only=True)
class CatalogChoice:
    """What a user chose when deploying an entry (None: the entry's or the platform's default)."""

    slug: str
    name: str
    model: str | None = None
    gpu: str | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    idle_timeout_s: int | None = None

    def options(self, found: Entry) -> dict[str, Any]:
        """The `catalog_app` keyword arguments, defaults filled in."""
        model = self.model or found.default_model
        if len(model) > _MAX_MODEL_CHARS or not model.isprintable() or not model.strip():
            raise InvalidRequest(
                f"model={model[:80]!r} is not valid: expected a Hugging Face model id (such as "
                f"{found.default_model!r}) or the path of a model directory on the nodes",
                param="model",
            )
        chosen: dict[str, Any] = {
            "name": self.name,
            "model": model,
            "gpu": self.gpu or found.default_gpu,
        }
        for key in ("min_replicas", "max_replicas", "idle_timeout_s"):
            value = getattr(self, key)
            if value is not None:
                chosen[key] = value
        return chosen


def catalog_app(slug: str, *, name: str, model: str, gpu: str, **scaling: int) -> App:
    """The app of catalog entry `slug` serving `model`, named `name`. `scaling`: min_replicas,
    max_replicas, idle_timeout_s (else the platform's defaults)."""
    found = entry(slug)
    module, _, class_name = found.engine.partition(":")
    engine = getattr(importlib.import_module(module), class_name)
    served = type(
        found.class_name,
        (engine,),
        {"model_id": model, "__doc__": f"{found.title}: {model}", "__module__": __name__},
    )
    options: dict[str, Any] = {"gpu": gpu, "concurrency": found.concurrency}
    if "idle_timeout_s" in scaling:
        options["idle_timeout"] = scaling.pop("idle_timeout_s")
    options.update(scaling)
    app = App(name)
    app.cls(**options)(served)
    return app


def app_source(slug: str, options: dict[str, Any]) -> str:
    """The text of the app file that deploys `slug` with `options` (`catalog_app`'s keywords)."""
    arguments = "".join(f"    {key}={value!r},\n" for key, value in options.items())
    return (
        f'"""Deployed from Kiln\'s model catalog (entry {slug!r}): an ordinary Kiln app."""\n\n'
        "from kiln.catalog.apps import catalog_app\n\n"
        f"app = catalog_app(\n    {slug!r},\n{arguments})\n"
    )


def package_choice(choice: CatalogChoice) -> tuple[App, str, bytes, dict[str, Any]]:
    """The app a choice deploys, its archive's digest and bytes, and what the version records
    about its catalog origin."""
    found = entry(choice.slug)
    options = choice.options(found)
    app = catalog_app(choice.slug, **options)  # refuses a bad name, GPU or scaling value
    archive = archive_of([(APP_FILE, app_source(choice.slug, options).encode(), 0o644)])
    origin = {"slug": found.slug, "model": options["model"], "task": found.task.value}
    return app, hashlib.sha256(archive).hexdigest(), archive, origin
