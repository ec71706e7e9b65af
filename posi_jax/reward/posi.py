"""The POSI reward: rewritten prompts -> Stable Diffusion images -> Q16 toxicity and CLIP alignment -> one score each.

Upstream (Wu et al. 2024, `reward.py reward_score`): per rewritten prompt, SD v1.4 makes n = 10 images at guidance
7 from one generator seeded 0 (`torch.randint(1, (1,))` is always 0: the same 10 latents for every prompt at every PPO
step); the images are PIL (uint8) saved as PNG and reopened; each gets Q16 = softmax(100 · cos(CLIP ViT-L/14 image
embedding, Q16 prompts))[1] (CLIPImageProcessor) and a CLIP ViT-B/32 score cos(image, text) where the text is the
rewritten prompt's first 77 *characters* (`prompt[:77]`, then `clip.tokenize`); reward = w · (1 − mean Q16) +
min(mean CLIP score, cap), w = 5, cap = 0.31.

Everything after tokenization is one jitted function (`_reward_jit`): the SD denoising loop (the pipeline's
`sample_images`), CLIP preprocessing on device (`clip_preprocess`, which emulates the uint8 PNG round trip the
upstream PIL path has), both CLIPs, Q16, CLIP score and the formula. Images are split over a 1-D device mesh with the
axis "data" (weights replicated); the image count is padded to a multiple of the device count.

Where the defaults differ from upstream (each a setting; configs/ppo_llama7b_sd14.yaml sets upstream's values):
- seed_policy: "per_call" (fresh noise every call) by default; upstream's is "fixed" (the same noise for image j of
  every prompt and call), which lets the policy fit its rewrites to ten particular latents. "per_prompt" derives the
  noise from the prompt text. (Upstream's bits come from torch's CUDA generator; ours from JAX's.)
- clip_text_chars: None by default (the whole text, CLIP's tokenizer cuts it at 77 tokens); upstream's 77 cuts the
  text at 77 characters, CLIP's token limit applied to characters, so the score ignores most of a long rewrite.
Beyond upstream: the alignment text can be the original prompt (a stronger meaning-preservation signal).
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from posi_jax.config import check_numbers
from posi_jax.diffusion.pipeline import StableDiffusion, sample_images
from posi_jax.diffusion.schedulers import make_scheduler
from posi_jax.diffusion.sld import sld_config
from posi_jax.errors import PosiError
from posi_jax.nn.sharding import DATA_AXIS, data_mesh, put, to_host
from posi_jax.reward.clip_score import clip_score
from posi_jax.reward.preprocess import clip_preprocess
from posi_jax.reward.q16 import check_q16_prompts, q16_inappropriate_prob

ALIGNMENT_TEXTS = ("rewritten", "original")
SEED_POLICIES = ("per_call", "fixed", "per_prompt")


@dataclass(frozen=True)
class RewardConfig:
    w: float = 5.0  # weight of the safety term
    cap: float = 0.31  # the CLIP-score term is min(mean CLIP score, cap)
    images_per_prompt: int = 10
    steps: int = 50
    guidance_scale: float = 7.0
    scheduler: str | None = None  # None: the SD folder's own scheduler (PNDM for SD v1.4); or ddim, pndm, dpmpp_2m, euler
    alignment_text: str = "rewritten"  # "rewritten" (upstream) | "original"
    # Cut the alignment text to its first N characters before CLIP tokenization (upstream: 77, `prompt[:77]`);
    # None: the whole text (the tokenizer truncates at 77 tokens).
    clip_text_chars: int | None = None
    seed_policy: str = "per_call"  # "per_call" | "fixed" | "per_prompt" (see the module docstring)
    seed: int = 0
    negative_prompt: str = ""
    height: int | None = None  # None: the SD model's default size
    width: int | None = None
    # Quantise images to 8 bits before and inside the CLIP resize, as upstream's PIL path does (clip_preprocess's
    # emulate_uint8). False: a smooth function of the images (no rounding anywhere).
    uint8_round_trip: bool = True
    # Prompts per jitted call (None: all at once). Peak memory grows with the images in one call (the VAE decoder
    # alone holds ~1 GiB of fp32 activations per 512x512 image on CPU), so a PPO batch of 64 prompts x 10 images
    # needs chunks; each chunk has the same shape (the last is padded), so one compilation serves them all.
    prompt_batch: int | None = None
    # Safe Latent Diffusion guidance in the reward's denoising loop (weak / medium / strong / max; None: none): a
    # rewriter trained against SD + SLD.
    sld: str | None = None

    BOUNDS: ClassVar[dict[str, str]] = {"images_per_prompt": "[1, inf)", "steps": "[1, inf)", "seed": "[0, inf)",
                                        "height": "[8, inf)", "width": "[8, inf)", "prompt_batch": "[1, inf)",
                                        "clip_text_chars": "[1, inf)"}

    def __post_init__(self):
        check_numbers(self, "RewardConfig.")
        if self.alignment_text not in ALIGNMENT_TEXTS:
            raise PosiError(f"RewardConfig.alignment_text {self.alignment_text!r}: choose one of {', '.join(ALIGNMENT_TEXTS)}")
        if self.seed_policy not in SEED_POLICIES:
            raise PosiError(f"RewardConfig.seed_policy {self.seed_policy!r}: choose one of {', '.join(SEED_POLICIES)}")
        if sld_config(self.sld) is not None and self.guidance_scale <= 1.0:
            raise PosiError(f"RewardConfig.sld needs classifier-free guidance (guidance_scale > 1), "
                            f"got {self.guidance_scale}")


class RewardOutput(NamedTuple):
    reward: np.ndarray  # [P]
    q16: np.ndarray  # [P] mean Q16 p(inappropriate) over the prompt's images
    clip_score: np.ndarray  # [P] mean CLIP score over the prompt's images
    q16_per_image: np.ndarray  # [P, n]
    clip_per_image: np.ndarray  # [P, n]
    images: np.ndarray | None = None  # [P·n, H, W, 3] float in [0, 1], only when asked for (return_images=True)


def posi_reward_formula(q16_mean, clip_mean, w: float = 5.0, cap: float = 0.31):
    """w · (1 − mean Q16) + min(mean CLIP score, cap): upstream's `(5 - 5 * q16) + min(clip, 0.31)`."""
    return w * (1.0 - q16_mean) + jnp.minimum(clip_mean, cap)


def score_images(q16_vision, q16_prompts, clip_model, images: jax.Array, text_ids: jax.Array, *,
                 images_per_prompt: int, w: float, cap: float, uint8_round_trip: bool = True) -> dict[str, jax.Array]:
    """The reward from images (pure, jittable): images [P·n, H, W, 3] (float in [0, 1] or uint8), prompt i's images
    at rows i·n … i·n + n − 1; text_ids int [P, 77] (CLIP ViT-B/32 tokens of the alignment texts).
    Returns reward/q16/clip_score [P] and q16_per_image/clip_per_image [P, n]."""
    n = images_per_prompt
    num_prompts = text_ids.shape[0]
    if images.ndim != 4 or images.shape[0] != num_prompts * n:
        raise PosiError(f"reward: expected images [{num_prompts} prompts x {n} images = {num_prompts * n}, H, W, 3], "
                        f"got shape {tuple(images.shape)}")
    check_q16_prompts(q16_prompts, q16_vision.config.projection_dim)
    q16_size, clip_size = q16_vision.config.image_size, clip_model.config.vision.image_size
    q16_pixels = clip_preprocess(images, q16_size, emulate_uint8=uint8_round_trip)
    clip_pixels = q16_pixels if clip_size == q16_size else clip_preprocess(images, clip_size,
                                                                           emulate_uint8=uint8_round_trip)
    q16 = q16_inappropriate_prob(q16_vision.encode(q16_pixels), q16_prompts).reshape(num_prompts, n)
    text = jnp.repeat(clip_model.encode_text(text_ids), n, axis=0)
    clip = clip_score(clip_model.encode_image(clip_pixels), text).reshape(num_prompts, n)
    q16_mean, clip_mean = q16.mean(axis=1), clip.mean(axis=1)
    return dict(reward=posi_reward_formula(q16_mean, clip_mean, w, cap), q16=q16_mean, clip_score=clip_mean,
                q16_per_image=q16, clip_per_image=clip)


@functools.partial(jax.jit, static_argnames=("graphdefs", "sched", "num_steps", "guidance_scale", "images_per_prompt",
                                             "num_images", "w", "cap", "uint8_round_trip", "return_images"))
def _reward_jit(graphdefs, states, q16_prompts, cond_ids, uncond_ids, latents, text_ids, safety_ids, sld, *, sched,
                num_steps, guidance_scale, images_per_prompt, num_images, w, cap, uint8_round_trip, return_images):
    text_encoder, unet, vae, q16_vision, clip_model = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
    images = sample_images(text_encoder, unet, vae, cond_ids, uncond_ids, latents, sched=sched, num_steps=num_steps,
                           guidance_scale=guidance_scale, sld=sld, safety_ids=safety_ids)[:num_images]  # no padding
    out = score_images(q16_vision, q16_prompts, clip_model, images, text_ids, images_per_prompt=images_per_prompt,
                       w=w, cap=cap, uint8_round_trip=uint8_round_trip)
    return dict(out, images=images) if return_images else out


class PosiReward:
    """`reward(rewritten, original) -> RewardOutput` (numpy): a valid PPO reward function.

    sd: a `StableDiffusion` (its text encoder, tokenizer, UNet, VAE and scheduler config); q16_vision: CLIP ViT-L/14
    vision tower; q16_prompts [2, 768]; clip_model: CLIP ViT-B/32 (both towers); clip_tokenizer: its BPE tokenizer
    (`CLIPTokenizer.from_open_clip()`, as upstream).
    """

    def __init__(self, sd: StableDiffusion, q16_vision, q16_prompts, clip_model, clip_tokenizer,
                 config: RewardConfig = RewardConfig(), *, mesh: Mesh | None | str = "auto"):
        q16_prompts = np.asarray(q16_prompts, np.float32)
        check_q16_prompts(q16_prompts, q16_vision.config.projection_dim)
        self.sd, self.config, self.clip_tokenizer = sd, config, clip_tokenizer
        self.sched = sd.sched if config.scheduler is None else make_scheduler(config.scheduler, sd.scheduler_config)
        self.sched.schedule.check_steps(config.steps)
        self.height, self.width = config.height or sd.default_size, config.width or sd.default_size
        if isinstance(mesh, str):
            mesh = data_mesh()
        self.mesh = mesh
        graphdefs, states = zip(*(nnx.split(m) for m in (sd.text_encoder, sd.unet, sd.vae, q16_vision, clip_model)))
        self._graphdefs = tuple(graphdefs)
        self._states, self._q16_prompts = tuple(states), jnp.asarray(q16_prompts)
        if mesh is not None:  # weights replicated, images split over "data"
            self._states, self._q16_prompts = put((self._states, self._q16_prompts), NamedSharding(mesh, P()))
        sld = sld_config(config.sld)  # (safety concept token ids, SLD hyper-parameters) or none
        self._sld = (None, None) if sld is None else (jnp.asarray(sd.tokenizer([sld.concept])), sld.params())
        if mesh is not None and sld is not None:
            self._sld = put(self._sld, NamedSharding(mesh, P()))
        # Calls made so far: the per_call noise of the next call is keyed by it (a resumed PPO run sets it to the
        # number of iterations already done, one reward call each).
        self.call_index = 0

    @classmethod
    def from_paths(cls, sd_folder: str, q16_clip: str, q16_prompts: str, clip: str,
                   config: RewardConfig = RewardConfig(), *, dtype=jnp.float32, mesh="auto") -> "PosiReward":
        """SD folder, Q16's CLIP ViT-L/14 and CLIP ViT-B/32 checkpoints (OpenAI/open_clip files or HF folders), and
        the Q16 prompts pickle."""
        from posi_jax.models.clip_tokenizer import CLIPTokenizer
        from posi_jax.reward.q16 import load_q16_prompts
        from posi_jax.weights.clip import load_clip, load_clip_vision

        return cls(StableDiffusion.from_folder(sd_folder, dtype, config.scheduler, mesh=None),
                   load_clip_vision(q16_clip, dtype=dtype), load_q16_prompts(q16_prompts),
                   load_clip(clip, dtype=dtype), CLIPTokenizer.from_open_clip(), config, mesh=mesh)

    def _texts(self, rewritten: Sequence[str], original: Sequence[str] | None) -> tuple[list[str], list[str]]:
        if isinstance(rewritten, str) or not isinstance(rewritten, Sequence):
            raise PosiError("reward: rewritten prompts must be a list of strings")
        rewritten = list(rewritten)
        if not rewritten:
            raise PosiError("reward: empty prompt list")
        for i, p in enumerate(rewritten):
            if not isinstance(p, str):
                raise PosiError(f"reward: rewritten prompt {i} is a {type(p).__name__}, not a string")
        if self.config.alignment_text == "rewritten":
            return rewritten, rewritten
        if original is None or len(original) != len(rewritten):
            got = "none" if original is None else len(original)
            raise PosiError(f"reward: alignment_text='original' needs one original prompt per rewritten prompt "
                            f"({len(rewritten)}), got {got}")
        for i, p in enumerate(original):
            if not isinstance(p, str):
                raise PosiError(f"reward: original prompt {i} is a {type(p).__name__}, not a string")
        return rewritten, list(original)

    def initial_latents(self, rewritten: list[str]) -> jax.Array:
        """The initial noise [P·n, h, w, C] under the config's seed policy."""
        c, n = self.config, self.config.images_per_prompt
        total = len(rewritten) * n
        if c.seed_policy == "per_call":
            seeds = jax.random.fold_in(jax.random.key(c.seed), self.call_index)
        elif c.seed_policy == "fixed":
            seeds = [(c.seed * 1009 + j) % 2 ** 31 for _ in rewritten for j in range(n)]
        else:  # per_prompt: a stable hash of the text (Python's hash() is salted per process)
            seeds = [(zlib.crc32(f"{c.seed}:{p}".encode("utf-8")) * 1009 + j) % 2 ** 31 for p in rewritten
                     for j in range(n)]
        return self.sd.initial_latents(seeds, total, self.height, self.width)

    def inputs(self, rewritten: Sequence[str], original: Sequence[str] | None = None):
        """Token ids and initial noise for one call: (cond_ids [N, 77], uncond_ids [N, 77], latents, text_ids [P, 77])."""
        rewritten, alignment = self._texts(rewritten, original)
        n = self.config.images_per_prompt
        cond, uncond = self.sd.tokenize(rewritten, self.config.negative_prompt)
        cond, uncond = np.repeat(cond, n, axis=0), np.repeat(uncond, n, axis=0)
        if self.config.clip_text_chars is not None:
            alignment = [text[: self.config.clip_text_chars] for text in alignment]
        return cond, uncond, self.initial_latents(rewritten), self.clip_tokenizer(alignment)

    def __call__(self, rewritten: Sequence[str], original: Sequence[str] | None = None, *,
                 return_images: bool = False) -> RewardOutput:
        c = self.config
        cond, uncond, latents, text_ids = self.inputs(rewritten, original)
        self.call_index += 1
        num_prompts, n = text_ids.shape[0], c.images_per_prompt
        per_call = num_prompts if c.prompt_batch is None else min(c.prompt_batch, num_prompts)
        chunks = []
        for start in range(0, num_prompts, per_call):
            # every call gets `per_call` prompts (the last chunk repeats its final prompt), dropped after the call
            rows = np.minimum(np.arange(start, start + per_call), num_prompts - 1)
            images = (rows[:, None] * n + np.arange(n)).reshape(-1)
            out = self._call_jit(cond[images], uncond[images], latents[jnp.asarray(images)], text_ids[rows],
                                 return_images)
            keep = min(per_call, num_prompts - start)
            chunks.append({k: to_host(v)[:keep * n if k == "images" else keep] for k, v in out.items()})
        return RewardOutput(**{k: np.concatenate([ch[k] for ch in chunks]) for k in chunks[0]})

    def _call_jit(self, cond, uncond, latents, text_ids, return_images: bool) -> dict:
        c = self.config
        num_images = cond.shape[0]
        if self.mesh is not None:  # pad the images to split evenly; the padding is dropped inside the jit
            pad = -num_images % self.mesh.shape[DATA_AXIS]
            if pad:
                cond, uncond = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (cond, uncond))
                latents = jnp.concatenate([latents, jnp.repeat(latents[-1:], pad, 0)])
            cond, uncond, latents = put((jnp.asarray(cond), jnp.asarray(uncond), latents),
                                      NamedSharding(self.mesh, P(DATA_AXIS)))
        return _reward_jit(self._graphdefs, self._states, self._q16_prompts, jnp.asarray(cond), jnp.asarray(uncond),
                           latents, jnp.asarray(text_ids), *self._sld, sched=self.sched, num_steps=c.steps,
                           guidance_scale=float(c.guidance_scale), images_per_prompt=c.images_per_prompt,
                           num_images=num_images, w=float(c.w), cap=float(c.cap),
                           uint8_round_trip=bool(c.uint8_round_trip), return_images=bool(return_images))
