"""`DiffusersImage`: a text-to-image pipeline from the Hugging Face hub (or a local directory)
serving the image task with diffusers, each image returned as PNG bytes.

The pipeline is loaded by `load`, an `@kiln.enter(snap=True)` hook, in half precision on a GPU.
A pipeline is not safe to run from two threads at once (its scheduler keeps the steps of the
run in progress), so calls take turns on a lock: a replica's concurrency beyond one only queues.

A size the pipeline cannot make (not a multiple of its VAE's scale factor) is refused with
`InvalidArguments` naming `size`, never rounded.

This module imports neither torch nor diffusers at the top: the router imports it to read the
class's specification.
"""

from __future__ import annotations

import io
import threading
from typing import Any, ClassVar

import kiln
from kiln.catalog.text import require_model_id

__all__ = ["DiffusersImage"]


class DiffusersImage:
    """A text-to-image model serving `image`. Subclass it with `model_id` set."""

    model_id: ClassVar[str] = ""
    # Inference steps when a request names none; None: the pipeline's own default.
    default_steps: ClassVar[int | None] = None

    # Set by `load` (kept in the snapshot).
    pipeline: Any
    size_multiple: int
    # Set by `start`.
    _turns: threading.Lock

    @kiln.enter(snap=True)
    def load(self) -> None:
        import torch
        from diffusers import AutoPipelineForText2Image

        require_model_id(self)
        gpu = torch.cuda.is_available()
        pipeline = AutoPipelineForText2Image.from_pretrained(  # type: ignore[no-untyped-call]
            self.model_id, dtype=torch.float16 if gpu else torch.float32
        )
        self.pipeline = pipeline.to("cuda" if gpu else "cpu")
        self.pipeline.set_progress_bar_config(disable=True)
        self.size_multiple = int(getattr(self.pipeline, "vae_scale_factor", 8))

    @kiln.enter()
    def start(self) -> None:
        self._turns = threading.Lock()

    @kiln.method(task="image")
    def generate(self, request: kiln.ImageRequest) -> kiln.Images:
        """`request.n` images of `request.prompt`, as PNG bytes."""
        import torch

        width, height = self._size(request.size)
        options: dict[str, Any] = {
            "prompt": request.prompt,
            "width": width,
            "height": height,
            "num_images_per_prompt": request.n,
            "output_type": "pil",
        }
        steps = request.steps or self.default_steps
        if steps is not None:
            options["num_inference_steps"] = steps
        if request.seed is not None:
            device = self.pipeline.device
            options["generator"] = torch.Generator(device=device).manual_seed(request.seed)
        with self._turns, torch.inference_mode():
            images = self.pipeline(**options).images
        return kiln.Images(png=[_png(image) for image in images])

    def _size(self, size: str) -> tuple[int, int]:
        """The width and height `size` ("WxH") names; raises when the pipeline cannot make it."""
        width_text, _, height_text = size.partition("x")
        if not (width_text.isdigit() and height_text.isdigit()):
            raise kiln.InvalidArguments(
                f"size={size!r} is not valid: write it as WIDTHxHEIGHT in pixels, such as "
                "'512x512'.",
                param="size",
            )
        width, height = int(width_text), int(height_text)
        multiple = self.size_multiple
        if width < multiple or height < multiple or width % multiple or height % multiple:
            raise kiln.InvalidArguments(
                f"size={size!r} is not a size this model can make: its width and height must "
                f"be multiples of {multiple} pixels (such as "
                f"'{_rounded(width, multiple)}x{_rounded(height, multiple)}').",
                param="size",
            )
        return width, height


def _rounded(pixels: int, multiple: int) -> int:
    return max(multiple, round(pixels / multiple) * multiple)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
