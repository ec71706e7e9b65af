"""Stable Diffusion folders (diffusers layout) -> our text encoder, UNet, VAE, tokenizer and scheduler config.

One mapping table each for the UNet and the VAE from diffusers' tensor names onto `posi_jax.models.unet` /
`posi_jax.models.vae` parameter paths: conv weights OIHW -> HWIO, linear weights [out, in] -> [in, out], 1x1 convs
(conv_shortcut, SD v1's conv proj_in/proj_out, the VAE's quant convs) -> linear kernels. Tensors are read with numpy
(safetensors, sharded safetensors, or a torch `.bin` zip read without torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.unet import UNet2DConditionModel, UNetConfig
from posi_jax.models.vae import AutoencoderKL, VAEConfig
from posi_jax.weights.common import Rule, conv_to_hwio, fill_abstract
from posi_jax.weights.safetensors_io import SafetensorsFolder, read_json, read_tensor_file


def linear_to_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear [out, in] or 1x1 Conv2d [out, in, 1, 1] -> kernel [in, out]."""
    if w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError("not a 1x1 conv")
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise ValueError("not a linear weight")
    return np.ascontiguousarray(w.T)


_LINEARS = r"to_q|to_k|to_v|time_emb_proj|proj_in|proj_out|conv_shortcut"
_CONVS = r"conv_in|conv_out|conv1|conv2"
_NORMS = r"norm1|norm2|norm3|norm|conv_norm_out|group_norm"

# Rules both tables share (ResNet blocks, resampling convs, attention, norms); the first matching rule wins.
_SHARED: list[Rule] = [
    Rule(r"(.+)\.to_out\.0\.weight", "{0}.to_out.kernel", linear_to_kernel),
    Rule(r"(.+)\.to_out\.0\.bias", "{0}.to_out.bias"),
    Rule(r"(.+)\.downsamplers\.0\.conv\.weight", "{0}.downsampler.conv.kernel", conv_to_hwio),
    Rule(r"(.+)\.downsamplers\.0\.conv\.bias", "{0}.downsampler.conv.bias"),
    Rule(r"(.+)\.upsamplers\.0\.conv\.weight", "{0}.upsampler.conv.kernel", conv_to_hwio),
    Rule(r"(.+)\.upsamplers\.0\.conv\.bias", "{0}.upsampler.conv.bias"),
    Rule(rf"((?:.+\.)?(?:{_LINEARS}))\.weight", "{0}.kernel", linear_to_kernel),
    Rule(rf"((?:.+\.)?(?:{_CONVS}))\.weight", "{0}.kernel", conv_to_hwio),
    Rule(rf"((?:.+\.)?(?:{_NORMS}))\.(weight|bias)", "{0}.{1}"),
    Rule(rf"((?:.+\.)?(?:{_LINEARS}|{_CONVS}))\.bias", "{0}.bias"),
]

UNET_TABLE: list[Rule] = [
    Rule(r"(.+)\.ff\.net\.0\.proj\.weight", "{0}.ff.proj.kernel", linear_to_kernel),
    Rule(r"(.+)\.ff\.net\.0\.proj\.bias", "{0}.ff.proj.bias"),
    Rule(r"(.+)\.ff\.net\.2\.weight", "{0}.ff.out.kernel", linear_to_kernel),
    Rule(r"(.+)\.ff\.net\.2\.bias", "{0}.ff.out.bias"),
    Rule(r"time_embedding\.(linear_[12])\.weight", "time_embedding.{0}.kernel", linear_to_kernel),
    Rule(r"time_embedding\.(linear_[12])\.bias", "time_embedding.{0}.bias"),
] + _SHARED

VAE_TABLE: list[Rule] = [
    Rule(r"(quant_conv|post_quant_conv)\.weight", "{0}.kernel", linear_to_kernel),
    Rule(r"(quant_conv|post_quant_conv)\.bias", "{0}.bias"),
    # pre-0.14 diffusers names of the mid-block attention, still found in older SD v1 folders
    *[Rule(rf"(.+\.attentions\.0)\.{old}\.weight", "{0}." + new + ".kernel", linear_to_kernel)
      for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out"))],
    *[Rule(rf"(.+\.attentions\.0)\.{old}\.bias", "{0}." + new + ".bias")
      for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out"))],
] + _SHARED

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors")


def _component_dir(path: str | Path, name: str) -> Path:
    """`path` is an SD folder holding `name/`, or that subfolder itself."""
    path = Path(path)
    if (path / name / "config.json").is_file():
        return path / name
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return path
    if not path.exists():
        raise PosiError(f"{path}: no such folder")
    raise PosiError(f"{path}: no {name}/ subfolder with a config.json (not a diffusers Stable Diffusion folder)")


def _tensor_source(folder: Path) -> tuple[list[str], Callable[[str], np.ndarray], str]:
    for name in _WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            st = SafetensorsFolder(folder, stem="diffusion_pytorch_model")
            return st.keys(), st.get, str(f)
        if name.endswith(".safetensors"):
            st = SafetensorsFolder(f)
            return st.keys(), st.get, str(f)
        state = read_tensor_file(f)
        return list(state), state.__getitem__, str(f)
    raise PosiError(f"{folder}: no weights file (expected one of {', '.join(_WEIGHT_FILES)})")


def _load(folder: Path, model_factory: Callable[[], nnx.Module], table: list[Rule]) -> nnx.Module:
    keys, get, source = _tensor_source(folder)
    return fill_abstract(nnx.eval_shape(model_factory), get, keys, table, source)


def load_unet(path: str | Path, dtype=jnp.float32, *, param_dtype=None) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel folder (or an SD folder holding `unet/`) -> our UNet, weights in param_dtype
    (default: dtype)."""
    folder = _component_dir(path, "unet")
    cfg = UNetConfig.from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    pd = dtype if param_dtype is None else param_dtype
    return _load(folder, lambda: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=pd, rngs=nnx.Rngs(0)),
                 UNET_TABLE)


def load_vae(path: str | Path, dtype=jnp.float32, *, param_dtype=None) -> AutoencoderKL:
    """A diffusers AutoencoderKL folder (or an SD folder holding `vae/`) -> our VAE."""
    folder = _component_dir(path, "vae")
    cfg = VAEConfig.from_diffusers(read_json(folder / "config.json"), str(folder / "config.json"))
    pd = dtype if param_dtype is None else param_dtype
    return _load(folder, lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=pd, rngs=nnx.Rngs(0)), VAE_TABLE)


@dataclass
class SDComponents:
    text_encoder: Any  # posi_jax.models.clip.CLIPTextTransformer
    tokenizer: Any  # posi_jax.models.clip_tokenizer.CLIPTokenizer
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict


def load_sd_folder(path: str | Path, dtype=jnp.float32, *, param_dtype=None, clip_skip: int = 0) -> SDComponents:
    """Every part of a diffusers Stable Diffusion folder (text_encoder/, tokenizer/, unet/, vae/, scheduler/).
    `clip_skip` is diffusers' clip_skip (text encoder layers not run before the final LayerNorm)."""
    from posi_jax.models.clip_tokenizer import CLIPTokenizer
    from posi_jax.weights.clip import load_clip_text_encoder

    path = Path(path)
    if not path.is_dir():
        raise PosiError(f"{path}: Stable Diffusion folder not found")
    for part in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        if not (path / part).is_dir():
            raise PosiError(f"{path}: missing {part}/ subfolder (a diffusers Stable Diffusion folder has text_encoder/,"
                            f" tokenizer/, unet/, vae/, scheduler/)")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    pd = dtype if param_dtype is None else param_dtype
    return SDComponents(
        text_encoder=load_clip_text_encoder(str(path / "text_encoder"), dtype, param_dtype=pd,
                                            skip_last_layers=clip_skip),
        tokenizer=CLIPTokenizer.from_folder(str(path / "tokenizer")),
        unet=load_unet(path / "unet", dtype, param_dtype=pd),
        vae=load_vae(path / "vae", dtype, param_dtype=pd),
        scheduler_config=scheduler_config,
    )


def has_safety_checker(path: str | Path) -> bool:
    """Whether an SD folder ships the safety checker (safety_checker/ with its config)."""
    return (Path(path) / "safety_checker" / "config.json").is_file()


def load_sd_safety_checker(path: str | Path, dtype=jnp.float32, *, param_dtype=None):
    """The safety checker of a diffusers SD folder (safety_checker/ + feature_extractor/), as diffusers' pipeline
    loads it; or a safety_checker/ folder itself, with its feature_extractor/ beside it. PosiError if absent."""
    from posi_jax.weights.safety_checker import load_safety_checker

    path = Path(path)
    checker = path / "safety_checker" if has_safety_checker(path) else path
    if not (checker / "config.json").is_file():
        raise PosiError(f"{path}: no safety_checker/ folder with a config.json")
    feature_extractor = checker.parent / "feature_extractor"
    if not feature_extractor.is_dir():
        raise PosiError(f"{checker.parent}: safety_checker/ without feature_extractor/ (its image preprocessing)")
    return load_safety_checker(checker, feature_extractor, dtype=dtype, param_dtype=param_dtype)
