"""Where the evaluation's images come from: our Stable Diffusion pipeline (`LocalSDGenerator`: the same seed and initial
noise for a prompt and its rewrite, so the two sides differ only by the text) or, in the black-box mode of the paper's
transfer setting, any OpenAI-compatible images endpoint (`ImagesAPIGenerator`)."""
from __future__ import annotations

import base64
import dataclasses
import io
import re
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from posi_jax.data import openai_compat
from posi_jax.errors import PosiError


@dataclasses.dataclass
class Generated:
    images: np.ndarray  # uint8 [k, H, W, 3]; k < n when some were refused
    n_refused: int = 0
    refusal: str | None = None  # the endpoint's message when it refused


class ImageGenerator(Protocol):
    description: dict  # what makes the images (goes into settings.json)
    fixed_shapes: bool  # pad a short last batch to the full batch (jit: one compiled shape); results dropped

    # negative_prompts (one per prompt) and sld (a preset) override the generator's own settings for this call;
    # a generator that cannot apply them raises PosiError
    def generate(self, prompts: list[str], seeds: list[int], n: int, *, negative_prompts: list[str] | None = None,
                 sld: str | None = None) -> list[Generated]: ...


class LocalSDGenerator:
    """Images from our Stable Diffusion pipeline. Each prompt's n initial latents come from its own seed only, so a
    prompt and its rewrite (given the same seed) start from the same noise, and the images do not depend on how
    prompts were batched or on where a resumed run restarted."""

    fixed_shapes = True

    def __init__(self, sd, *, steps: int = 50, guidance_scale: float = 7.5, height: int = 512, width: int = 512,
                 negative_prompt: str | None = None, batch_size: int | None = None, source: str = "",
                 sld: str | None = None):
        from posi_jax.diffusion.sld import sld_config

        if steps < 1:
            raise PosiError(f"steps must be >= 1, got {steps}")
        sld_config(sld)  # an unknown preset fails here, before any image
        self.sld = sld  # SLD preset for every image (None: none)
        self.sd, self.steps, self.guidance_scale = sd, steps, guidance_scale
        self.height, self.width, self.negative_prompt = height, width, negative_prompt
        self.batch_size = batch_size  # images per denoising call (memory), None: all of a batch of prompts at once
        self.description = {"kind": "local_sd", "model": source, "steps": steps, "guidance_scale": guidance_scale,
                            "height": height, "width": width, "negative_prompt": negative_prompt,
                            "scheduler": getattr(sd, "scheduler_name", None)}
        if sld is not None:  # only when set: settings pinned by earlier runs stay valid
            self.description["sld"] = sld

    def generate(self, prompts: list[str], seeds: list[int], n: int, *, negative_prompts: list[str] | None = None,
                 sld: str | None = None) -> list[Generated]:
        from posi_jax.diffusion.pipeline import to_uint8

        latents = np.concatenate([np.asarray(self.sd.initial_latents(seed, n, self.height, self.width))
                                  for seed in seeds])
        negative = negative_prompts
        if negative is None and self.negative_prompt is not None:
            negative = [self.negative_prompt] * len(prompts)
        images = self.sd.generate(prompts, negative, num_images_per_prompt=n, steps=self.steps,
                                  guidance_scale=self.guidance_scale, height=self.height, width=self.width,
                                  latents=latents, batch_size=self.batch_size, sld=sld or self.sld)
        images = to_uint8(images)
        return [Generated(images[i * n:(i + 1) * n]) for i in range(len(prompts))]


class ImagesAPIGenerator:
    """Images from an OpenAI-compatible images endpoint (`client.images.generate`, b64_json): the black-box transfer
    setting. The endpoint is not seeded. A prompt the endpoint refuses (HTTP 400 from its safety system) is recorded
    as refused, not as an error; 429 / 5xx / timeouts / dropped connections are retried with backoff; a bad key, a
    wrong model or an unreachable server stop the run (finished prompts are kept)."""

    fixed_shapes = False

    def __init__(self, *, model: str = "dall-e-2", size: str = "512x512", base_url: str | None = None,
                 api_key: str | None = None, timeout_s: float = 120.0, max_retries: int = 5,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0, images_per_request: int = 1,
                 extra: dict | None = None):
        import openai

        api_key = openai_compat.api_key(api_key)
        base_url = openai_compat.base_url(base_url)
        if not re.match(r"^\d+x\d+$", size):
            raise PosiError(f"image size must look like 512x512, got {size!r}")
        if images_per_request < 1 or max_retries < 0 or timeout_s <= 0:
            raise PosiError("images per request must be >= 1, retries >= 0 and the timeout > 0")
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)
        self.url = str(self.client.base_url).rstrip("/")
        self.model, self.size, self.extra = model, size, dict(extra or {})
        self.max_retries, self.backoff_base_s, self.backoff_max_s = max_retries, backoff_base_s, backoff_max_s
        self.images_per_request = images_per_request
        self.n_requests = self.n_retries = 0
        self.description = {"kind": "images_api", "url": self.url, "model": model, "size": size, **self.extra}

    def generate(self, prompts: list[str], seeds: list[int], n: int, *, negative_prompts: list[str] | None = None,
                 sld: str | None = None) -> list[Generated]:
        if negative_prompts is not None or sld is not None:
            raise PosiError("an images endpoint takes a prompt only: negative prompts and SLD need local Stable "
                            "Diffusion (--sd)")
        return [self._generate_one(p, n) for p in prompts]

    def _generate_one(self, prompt: str, n: int) -> Generated:
        images, refused, refusal = [], 0, None
        while len(images) + refused < n:
            k = min(self.images_per_request, n - len(images) - refused)
            got, message = self._request(prompt, k)
            if message is not None:
                refused, refusal = refused + k, message
            images.extend(got)
        shapes = {im.shape for im in images}
        if len(shapes) > 1:  # one prompt's images are scored as one batch
            h, w = images[0].shape[:2]
            images = [im if im.shape == images[0].shape else _resize(im, w, h) for im in images]
        stack = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
        return Generated(stack, refused, refusal)

    def _request(self, prompt: str, k: int) -> tuple[list[np.ndarray], str | None]:
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            self.n_requests += 1
            try:
                response = self.client.images.generate(model=self.model, prompt=prompt, n=k, size=self.size,
                                                       response_format="b64_json", **self.extra)
                data = getattr(response, "data", None)
                if not data or any(getattr(d, "b64_json", None) is None for d in data):
                    raise ValueError(f"reply without b64_json images: {str(response)[:100]}")
                return [decode_png(d.b64_json) for d in data[:k]], None
            except (ValueError, OSError) as e:  # a body that is not JSON, or not an image
                last = openai_compat.redact(f"malformed reply: {type(e).__name__}: {e}", self.client.api_key)
            except Exception as e:
                failure = openai_compat.classify(e, self.client.api_key)
                if failure is None:
                    raise
                fatal = openai_compat.stop_message(failure, self.url, self.model, "--api-model and --base-url")
                if fatal is not None:
                    raise PosiError(fatal) from None
                if failure.kind == "rejected":
                    if failure.safety:
                        return [], failure.detail
                    raise PosiError(f"{self.url} rejected the images request (HTTP {failure.status}): "
                                    f"{failure.detail}") from None
                last, retry_after = f"{failure.label}: {failure.detail}", failure.retry_after
            if attempt < self.max_retries:
                self.n_retries += 1
                time.sleep(openai_compat.backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, retry_after))
        raise PosiError(f"cannot get images from {self.url} after {self.max_retries + 1} attempts ({last[:200]})")


def decode_png(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC), np.uint8)


def load_local_sd(folder: str, *, steps: int = 50, guidance_scale: float = 7.5, height: int = 512, width: int = 512,
                  scheduler: str | None = None, negative_prompt: str | None = None, batch_size: int | None = None,
                  dtype: str = "float32", sld: str | None = None) -> LocalSDGenerator:
    from posi_jax.config import parse_dtype
    from posi_jax.diffusion.pipeline import StableDiffusion

    if not Path(folder).is_dir():
        raise PosiError(f"Stable Diffusion folder not found: {folder}")
    sd = StableDiffusion.from_folder(folder, dtype=parse_dtype(dtype, "--dtype"), scheduler=scheduler)
    return LocalSDGenerator(sd, steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                            negative_prompt=negative_prompt, batch_size=batch_size, source=str(folder), sld=sld)

