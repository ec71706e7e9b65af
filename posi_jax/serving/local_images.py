"""Images from our own Stable Diffusion (`--sd FOLDER`): one image per jitted call at one of a few sizes compiled at
start-up, on a device thread of its own, returned as base64 PNGs like OpenAI's `b64_json`."""
from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from posi_jax.errors import PosiError
from posi_jax.serving.errors import APIError


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    m = re.fullmatch(r"(\d+)x(\d+)", size or "")
    if m is None:
        raise PosiError(f"image size must look like 512x512, got {size!r}")
    return int(m.group(1)), int(m.group(2))


class LocalImages:
    kind = "local_sd"

    def __init__(self, sd, *, source: str, steps: int = 50, guidance_scale: float = 7.5,
                 sizes: tuple[str, ...] = (), max_n: int = 4, seed: int = 0):
        if steps < 1 or max_n < 1:
            raise PosiError(f"--sd-steps and --sd-max-n must be >= 1, got {steps} and {max_n}")
        self.sd, self.source, self.steps, self.guidance_scale = sd, source, steps, guidance_scale
        self.sizes = tuple(sizes) or (f"{sd.default_size}x{sd.default_size}",)
        for size in self.sizes:
            parse_size(size)
        self.max_n = max_n
        self._seed = seed
        self._device = ThreadPoolExecutor(1, thread_name_prefix="stable-diffusion")

    def describe(self) -> dict:
        return {"kind": self.kind, "model": self.source, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "sizes": list(self.sizes), "max_n": self.max_n}

    def warm_up(self) -> float:
        """Draw one image at each served size (compiling it); returns the seconds taken."""
        t0 = time.perf_counter()
        for size in self.sizes:
            self._draw("warm-up", size, 0)
        return time.perf_counter() - t0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._device.shutdown(wait=True)

    def check(self, n: int, size: str | None, response_format: str | None) -> str:
        """The size to draw (400 for a request this backend cannot serve)."""
        if response_format == "url":
            raise APIError(400, "this server draws images locally and returns them inline: use response_format "
                                "b64_json", param="response_format", code="unsupported_value")
        if n > self.max_n:
            raise APIError(400, f"n={n}: this server draws at most {self.max_n} images per request", param="n",
                           code="invalid_value")
        size = size or self.sizes[0]
        if size not in self.sizes:
            raise APIError(400, f"size {size!r} is not served; sizes: {', '.join(self.sizes)}", param="size",
                           code="invalid_value")
        return size

    async def generate(self, prompt: str, n: int, size: str) -> list[str]:
        """n base64 PNGs of `prompt`, each from its own seed."""
        loop = asyncio.get_running_loop()
        out = []
        for _ in range(n):
            seed, self._seed = self._seed, (self._seed + 1) % 2**31
            out.append(await loop.run_in_executor(self._device, partial(self._draw, prompt, size, seed)))
        return out

    def _draw(self, prompt: str, size: str, seed: int) -> str:
        from PIL import Image

        from posi_jax.diffusion.pipeline import to_uint8

        width, height = parse_size(size)
        image = self.sd.generate([prompt], seed=seed, num_images_per_prompt=1, steps=self.steps,
                                 guidance_scale=self.guidance_scale, height=height, width=width)
        buf = io.BytesIO()
        Image.fromarray(to_uint8(image)[0]).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
