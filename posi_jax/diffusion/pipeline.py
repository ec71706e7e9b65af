"""Text -> image with Stable Diffusion: the one denoising loop.

`sample_images` is the pure core (text encoder, UNet, VAE and token ids in; images in [0, 1] out): the whole sampling
loop is one `lax.scan`, classifier-free guidance is one UNet call per step on the [uncond, cond] batch, and it is
meant to be called inside a jit (ours below, or the reward's). `StableDiffusion` wraps it for prompts: tokenizing,
seeded initial noise, input checks, chunking, and data-parallel sharding of the images over a 1-D device mesh with the
axis "data". Images and latents are NHWC. Safe Latent Diffusion (`sld`) is an option of the same loop.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from posi_jax.diffusion.schedulers import Scheduler, make_scheduler
from posi_jax.diffusion.sld import SLDConfig, SLDParams, sld_config, sld_guidance
from posi_jax.errors import PosiError
from posi_jax.nn.sharding import DATA_AXIS, data_mesh, put


def sample_images(text_encoder, unet, vae, cond_ids: jax.Array, uncond_ids: jax.Array, latents: jax.Array, *,
                  sched: Scheduler, num_steps: int, guidance_scale: float | jax.Array,
                  sld: SLDConfig | SLDParams | None = None, safety_ids: jax.Array | None = None) -> jax.Array:
    """Denoise `latents` (initial noise [N, h, w, C], unscaled) conditioned on `cond_ids` (int [N, 77]) with
    classifier-free guidance against `uncond_ids` (the negative prompts, "" by default), then decode with the VAE.

    Returns float32 images [N, H, W, 3] in [0, 1]. `num_steps` and `sched` are static. A Python `guidance_scale`
    <= 1 turns guidance off (one UNet batch of N, as diffusers); a traced one always guides. The scheduler runs in
    float32 whatever the models' compute dtype.

    `sld` adds Safe Latent Diffusion guidance (`diffusion/sld.py`) against the safety concept whose token ids are
    `safety_ids` (int [1, 77]): the concept is a third text in the same UNet call (3N rows) and the SLD momentum is
    carried through the scan. Whether SLD is on is static; its hyper-parameters (`SLDParams`) may be traced. SLD
    needs classifier-free guidance.
    """
    n = latents.shape[0]
    if cond_ids.shape[0] != n or uncond_ids.shape[0] != n:
        raise PosiError(f"sample_images: {n} latents but {cond_ids.shape[0]} prompt and {uncond_ids.shape[0]} "
                        "negative-prompt token rows")
    guided = not isinstance(guidance_scale, (int, float)) or guidance_scale > 1.0
    if sld is not None and (not guided or safety_ids is None):
        raise PosiError("sample_images: SLD needs classifier-free guidance (guidance_scale > 1) and the safety "
                        "concept's token ids")
    if isinstance(sld, SLDConfig):
        sld = sld.params()
    texts = 3 if sld is not None else 2  # UNet rows per image when guided
    if guided:
        # [N, 2] interleaved (uncond, cond) rows: reshaping keeps each image's pair on the device holding the image,
        # so data-parallel sharding over N needs no communication
        ids = jnp.stack([uncond_ids, cond_ids], axis=1).reshape(2 * n, -1)
    else:
        ids = cond_ids
    context = text_encoder(ids)[0]
    if sld is not None:  # the concept is encoded once and repeated as every image's third row
        concept = text_encoder(jnp.asarray(safety_ids).reshape(1, -1))[0]
        context = jnp.concatenate([context.reshape(n, 2, *context.shape[1:]),
                                   jnp.broadcast_to(concept[None], (n, *concept.shape))], axis=1)
        context = context.reshape(3 * n, *context.shape[2:])
    timesteps = jnp.asarray(sched.timesteps(num_steps))
    state = sched.init_state(latents.shape, num_steps)
    x = latents.astype(jnp.float32) * sched.init_noise_sigma(num_steps)
    momentum = None if sld is None else jnp.zeros(latents.shape, jnp.float32)
    compute_dtype = unet.dtype

    def denoise(carry, step):
        x, state, momentum = carry
        i, t = step
        model_input = sched.scale_model_input(state, x, i).astype(compute_dtype)
        if guided:
            rows = jnp.stack([model_input] * texts, axis=1).reshape(texts * n, *x.shape[1:])
            eps = unet(rows, t, context).astype(jnp.float32).reshape(n, texts, *x.shape[1:])
            eps_uncond, eps_cond = eps[:, 0], eps[:, 1]
            if sld is None:
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            else:
                direction, momentum = sld_guidance(eps_uncond, eps_cond, eps[:, 2], momentum, i, sld)
                eps = eps_uncond + guidance_scale * direction
        else:
            eps = unet(model_input, t, context).astype(jnp.float32)
        return (*sched.step(state, eps, i, x), momentum), None

    (x, _, _), _ = jax.lax.scan(denoise, (x, state, momentum), (jnp.arange(len(timesteps)), timesteps))
    images = vae.decode((x / vae.scaling_factor).astype(compute_dtype))
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("graphdefs", "sched", "num_steps", "guidance_scale"))
def _sample_jit(graphdefs, states, cond_ids, uncond_ids, latents, safety_ids, sld, *, sched, num_steps,
                guidance_scale):
    text_encoder, unet, vae = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
    return sample_images(text_encoder, unet, vae, cond_ids, uncond_ids, latents, sched=sched, num_steps=num_steps,
                         guidance_scale=guidance_scale, sld=sld, safety_ids=safety_ids)


def initial_latents(seed_or_key, n: int, height: int, width: int, *, channels: int = 4,
                    scale_factor: int = 8) -> jax.Array:
    """Initial noise float32 [n, height/scale_factor, width/scale_factor, channels] for images of height x width.

    Image i gets its own key, fold_in(key, i) of the seed's key, so an image's noise does not depend on n or on how
    images are batched. `seed_or_key`: an int seed, a JAX PRNG key, or a sequence of n int seeds (one per image).
    """
    _check_size(height, width, scale_factor)
    shape = (height // scale_factor, width // scale_factor, channels)
    if isinstance(seed_or_key, (list, tuple, np.ndarray)) and not _is_key(seed_or_key):
        seeds = [int(s) for s in seed_or_key]
        if len(seeds) != n:
            raise PosiError(f"initial_latents: {len(seeds)} seeds for {n} images")
        if any(not 0 <= s < 2 ** 31 for s in seeds):
            raise PosiError(f"initial_latents: seeds must be in [0, 2**31), got {seeds}")
        return _noise_per_seed(jnp.asarray(seeds, jnp.int32), shape)
    key = seed_or_key if _is_key(seed_or_key) else jax.random.key(int(seed_or_key))
    return _noise_per_index(key, n, shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noise_per_index(key: jax.Array, n: int, shape: tuple[int, ...]) -> jax.Array:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


@functools.partial(jax.jit, static_argnums=1)
def _noise_per_seed(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), shape, jnp.float32))(seeds)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and (jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or
                                         (x.dtype == jnp.uint32 and x.shape == (2,)))


def _check_size(height: int, width: int, multiple: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0 or v % multiple:
            raise PosiError(f"{name}={v!r}: must be a positive multiple of {multiple}")


def to_uint8(images) -> np.ndarray:
    """float images in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil (what a saved PNG holds)."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(image, path: str | Path) -> None:
    """One image (float [H, W, 3] in [0, 1] or uint8) as a PNG."""
    from PIL import Image

    image = np.asarray(image)
    Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image)).save(path)


def image_grid(images, cols: int | None = None) -> np.ndarray:
    """uint8 [rows*H, cols*W, 3] grid of N same-size images (row-major, black padding)."""
    images = to_uint8(images) if np.asarray(images).dtype != np.uint8 else np.asarray(images)
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return grid


class StableDiffusion:
    """A loaded SD folder + scheduler. `generate` runs `sample_images` jitted, data-parallel over `mesh` (default:
    every device on one "data" axis when there are several; None or one device: unsharded)."""

    def __init__(self, text_encoder, tokenizer, unet, vae, scheduler_config: dict, *, scheduler: str | None = None,
                 mesh: Mesh | None | str = "auto"):
        self.text_encoder, self.tokenizer, self.unet, self.vae = text_encoder, tokenizer, unet, vae
        self.scheduler_config = scheduler_config
        self.sched = make_scheduler(scheduler, scheduler_config)
        self.scheduler_name = self.sched.name
        self.vae_scale_factor = 2 ** (len(vae.cfg.block_out_channels) - 1)
        self.latent_channels = unet.cfg.in_channels
        # the UNet halves the latent once per down block but the last
        self._latent_multiple = 2 ** (len(unet.cfg.down_block_types) - 1)
        if isinstance(mesh, str):
            mesh = data_mesh()
        self.mesh = mesh
        graphdefs, states = zip(*(nnx.split(m) for m in (text_encoder, unet, vae)))
        self._graphdefs = tuple(graphdefs)
        if mesh is not None:
            states = put(states, NamedSharding(mesh, P()))  # weights replicated, images split
        self._states = tuple(states)

    @classmethod
    def from_folder(cls, path: str | Path, dtype=jnp.float32, scheduler: str | None = None, *, param_dtype=None,
                    mesh: Mesh | None | str = "auto") -> "StableDiffusion":
        """A diffusers SD folder. `dtype` is the compute dtype (float32 / bfloat16); `param_dtype` defaults to it."""
        from posi_jax.weights.sd import load_sd_folder

        parts = load_sd_folder(path, dtype, param_dtype=param_dtype)
        return cls(parts.text_encoder, parts.tokenizer, parts.unet, parts.vae, parts.scheduler_config,
                   scheduler=scheduler, mesh=mesh)

    @property
    def default_size(self) -> int:
        return self.unet.cfg.sample_size * self.vae_scale_factor

    def initial_latents(self, seed_or_key, n: int, height: int | None = None, width: int | None = None) -> jax.Array:
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        return initial_latents(seed_or_key, n, height, width,
                               channels=self.latent_channels, scale_factor=self.vae_scale_factor)

    def tokenize(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise PosiError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise PosiError(f"prompt {i}: expected a string, got {type(p).__name__}")
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        negative_prompts = list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise PosiError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        for i, p in enumerate(negative_prompts):
            if not isinstance(p, str):
                raise PosiError(f"negative prompt {i}: expected a string, got {type(p).__name__}")
        return self.tokenizer(prompts), self.tokenizer(negative_prompts)

    def generate(self, prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str | None = None, *,
                 seed=0, num_images_per_prompt: int = 1, steps: int = 50, guidance_scale: float = 7.5,
                 height: int | None = None, width: int | None = None, latents=None,
                 batch_size: int | None = None, sld: SLDConfig | str | None = None) -> jax.Array:
        """float32 images [len(prompts) * num_images_per_prompt, H, W, 3] in [0, 1], on device; each prompt's
        images are consecutive. `latents` (NHWC initial noise) replaces the seeded noise. `batch_size` images at a
        time (default: all at once); every chunk has the same shape, so one compilation serves them all. `sld`: Safe
        Latent Diffusion guidance, a preset name (weak / medium / strong / max) or an `SLDConfig`."""
        sld = sld_config(sld)
        if sld is not None and float(guidance_scale) <= 1.0:
            raise PosiError(f"SLD needs classifier-free guidance: guidance scale {guidance_scale} must be > 1")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        _check_size(height, width, 8)
        _check_size(height, width, self.vae_scale_factor * self._latent_multiple)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise PosiError(f"num_images_per_prompt={num_images_per_prompt!r}: must be an integer >= 1")
        self.sched.schedule.check_steps(steps)
        cond, uncond = self.tokenize(prompts, negative_prompts)
        cond = np.repeat(cond, num_images_per_prompt, axis=0)
        uncond = np.repeat(uncond, num_images_per_prompt, axis=0)
        n = cond.shape[0]
        shape = (n, height // self.vae_scale_factor, width // self.vae_scale_factor, self.latent_channels)
        if latents is None:
            latents = self.initial_latents(seed, n, height, width)
        elif tuple(np.shape(latents)) != shape:
            raise PosiError(f"latents: expected shape {shape} (N, height/{self.vae_scale_factor}, "
                            f"width/{self.vae_scale_factor}, {self.latent_channels}), got {tuple(np.shape(latents))}")
        latents = jnp.asarray(latents, jnp.float32)

        chunk = n if batch_size is None else max(1, min(int(batch_size), n))
        if self.mesh is not None:  # each chunk splits evenly over the data axis
            d = self.mesh.shape[DATA_AXIS]
            chunk = -(-chunk // d) * d
        total = -(-n // chunk) * chunk
        if total != n:  # pad with copies of the last image, dropped after
            pad = total - n
            cond, uncond = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (cond, uncond))
            latents = jnp.concatenate([latents, jnp.repeat(latents[-1:], pad, 0)])
        sld_args = (None, None) if sld is None else (jnp.asarray(self.tokenizer([sld.concept])), sld.params())
        if sld is not None and self.mesh is not None:
            sld_args = put(sld_args, NamedSharding(self.mesh, P()))
        out = []
        for start in range(0, total, chunk):
            args = (jnp.asarray(cond[start:start + chunk]), jnp.asarray(uncond[start:start + chunk]),
                    latents[start:start + chunk])
            if self.mesh is not None:
                args = put(args, NamedSharding(self.mesh, P(DATA_AXIS)))
            out.append(_sample_jit(self._graphdefs, self._states, *args, *sld_args, sched=self.sched,
                                   num_steps=steps, guidance_scale=float(guidance_scale)))
        images = out[0] if len(out) == 1 else jnp.concatenate(out)
        return images[:n]
