"""What the engine reads of a job: the settings of one generation, validated before it reaches the engine.

`mlx_sd_server.job.Job` (built and checked by `job.build_job`) is one; the engine names only this protocol, so
it never imports the request layer above it.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class Request(Protocol):
    prompt: str
    negative_prompt: str
    n: int
    steps: int
    cfg_scale: float
    sample_method: str
    scheduler: str
    width: int
    height: int
    guidance: float | None
    max_sequence_length: int | None  # T5's tokens per prompt, for models with T5 (None: the model's own)
    init_image: Image.Image | None
    strength: float
    mask: Image.Image | None
    reference_images: tuple[Image.Image, ...]  # instruction edits' input images, in order
    control_image: Image.Image | None
    control_strength: float
    control_preprocess: str
    loras: tuple[tuple[str, float], ...]
    # Hires fix (None: off): the first pass at width x height, then per image an img2img at hr_width x hr_height
    hr_scale: float | None
    hr_upscaler: str  # an upscaler's name, or one of hires.LATENT_UPSCALE_MODES

    def seeds(self) -> list[int]: ...
    def first_pass(self) -> Request: ...
    def second_pass(self, index: int, init_image: Image.Image | None) -> Request: ...
