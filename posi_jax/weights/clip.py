"""CLIP checkpoint loading: one mapping table per layout, onto `posi_jax.models.clip` parameter paths.

Layouts:
  HF       `CLIPModel` / `CLIPTextModel(WithProjection)` / `CLIPVisionModel(WithProjection)` folders
           (config.json + model.safetensors, sharded safetensors, or pytorch_model.bin) — SD's `text_encoder/`.
  OpenAI   OpenAI CLIP / open_clip state dicts (`transformer.resblocks.N.attn.in_proj_weight`, `visual.conv1` ...)
           from .safetensors, a torch .bin/.pt file or OpenAI's TorchScript .pt (all read without torch).

Each table row names the tower it belongs to; `_rules(table, tower)` turns it into `weights.common.Rule`s for the
whole model (targets under `text_model.` / `vision_model.`) or for one tower (the other tower's tensors become
known-and-dropped rules). `weights.common.fill_abstract` then builds the model from `nnx.eval_shape`, checks every
shape, and errors on missing, unexpected or doubly-mapped tensors.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextTransformer,
    CLIPVisionConfig,
    CLIPVisionTransformer,
)
from posi_jax.weights.common import Rule, conv_to_hwio, fill_abstract, transpose
from posi_jax.weights.safetensors_io import SafetensorsFolder, read_json, read_tensor_file
from posi_jax.weights.torch_pickle import read_torch_file

__all__ = ["HF_TABLE", "OPENAI_TABLE", "clip_rules", "load_clip", "load_clip_text", "load_clip_vision",
           "load_clip_text_encoder", "openai_config_from_state", "read_tensor_file"]


def _qkv_part(i: int, as_kernel: bool):
    """Slice q (0), k (1) or v (2) out of a fused in_proj weight [3D, D] (-> kernel [D, D]) or bias [3D]."""

    def f(w: np.ndarray) -> np.ndarray:
        part = w[i * (w.shape[0] // 3):(i + 1) * (w.shape[0] // 3)]
        return transpose(part) if as_kernel else np.ascontiguousarray(part)

    return f


_QKV = tuple(f"encoder.layers.{{0}}.self_attn.{n}_proj" for n in "qkv")

# (tower, checkpoint-key regex, parameter path inside that tower (None: known, dropped), transform)
# tower: "text" | "vision" | "model" (a CLIPModel-level parameter, e.g. logit_scale)
_Row = tuple[str, str, "str | tuple[str, ...] | None", object]


def _hf_layer_rows(tower: str) -> list[_Row]:
    L = rf"{tower}_model\.encoder\.layers\.(\d+)\."
    return [
        (tower, L + r"self_attn\.(q|k|v|out)_proj\.weight", "encoder.layers.{0}.self_attn.{1}_proj.kernel", transpose),
        (tower, L + r"self_attn\.(q|k|v|out)_proj\.bias", "encoder.layers.{0}.self_attn.{1}_proj.bias", None),
        (tower, L + r"layer_norm([12])\.(weight|bias)", "encoder.layers.{0}.layer_norm{1}.{2}", None),
        (tower, L + r"mlp\.(fc[12])\.weight", "encoder.layers.{0}.mlp.{1}.kernel", transpose),
        (tower, L + r"mlp\.(fc[12])\.bias", "encoder.layers.{0}.mlp.{1}.bias", None),
    ]


HF_TABLE: list[_Row] = [
    ("text", r"text_model\.embeddings\.token_embedding\.weight", "token_embedding", None),
    ("text", r"text_model\.embeddings\.position_embedding\.weight", "position_embedding", None),
    ("text", r"text_model\.embeddings\.position_ids", None, None),  # a buffer in older checkpoints
    *_hf_layer_rows("text"),
    ("text", r"text_model\.final_layer_norm\.(weight|bias)", "final_layer_norm.{0}", None),
    ("text", r"text_projection\.weight", "text_projection.kernel", transpose),
    ("vision", r"vision_model\.embeddings\.position_ids", None, None),
    ("vision", r"vision_model\.embeddings\.class_embedding", "class_embedding", None),
    ("vision", r"vision_model\.embeddings\.patch_embedding\.weight", "patch_embedding", conv_to_hwio),
    ("vision", r"vision_model\.embeddings\.position_embedding\.weight", "position_embedding", None),
    *_hf_layer_rows("vision"),
    ("vision", r"vision_model\.(pre_layrnorm|post_layernorm)\.(weight|bias)", "{0}.{1}", None),
    ("vision", r"visual_projection\.weight", "visual_projection.kernel", transpose),
    ("model", r"logit_scale", "logit_scale", None),
]


def _openai_layer_rows(tower: str, prefix: str) -> list[_Row]:
    L = prefix + r"transformer\.resblocks\.(\d+)\."
    return [
        (tower, L + r"attn\.in_proj_weight", tuple(t + ".kernel" for t in _QKV),
         tuple(_qkv_part(i, True) for i in range(3))),
        (tower, L + r"attn\.in_proj_bias", tuple(t + ".bias" for t in _QKV), tuple(_qkv_part(i, False) for i in range(3))),
        (tower, L + r"attn\.out_proj\.weight", "encoder.layers.{0}.self_attn.out_proj.kernel", transpose),
        (tower, L + r"attn\.out_proj\.bias", "encoder.layers.{0}.self_attn.out_proj.bias", None),
        (tower, L + r"ln_([12])\.(weight|bias)", "encoder.layers.{0}.layer_norm{1}.{2}", None),
        (tower, L + r"mlp\.c_fc\.weight", "encoder.layers.{0}.mlp.fc1.kernel", transpose),
        (tower, L + r"mlp\.c_fc\.bias", "encoder.layers.{0}.mlp.fc1.bias", None),
        (tower, L + r"mlp\.c_proj\.weight", "encoder.layers.{0}.mlp.fc2.kernel", transpose),
        (tower, L + r"mlp\.c_proj\.bias", "encoder.layers.{0}.mlp.fc2.bias", None),
    ]


# OpenAI / open_clip: text tower at the top level, vision tower under `visual.`; fused qkv split by the table.
OPENAI_TABLE: list[_Row] = [
    ("text", r"token_embedding\.weight", "token_embedding", None),
    ("text", r"positional_embedding", "position_embedding", None),
    ("text", r"attn_mask", None, None),  # the causal-mask buffer
    *_openai_layer_rows("text", ""),
    ("text", r"ln_final\.(weight|bias)", "final_layer_norm.{0}", None),
    ("text", r"text_projection", "text_projection.kernel", None),  # already [width, embed]: x @ proj
    ("vision", r"visual\.conv1\.weight", "patch_embedding", conv_to_hwio),
    ("vision", r"visual\.class_embedding", "class_embedding", None),
    ("vision", r"visual\.positional_embedding", "position_embedding", None),
    ("vision", r"visual\.ln_pre\.(weight|bias)", "pre_layrnorm.{0}", None),
    *_openai_layer_rows("vision", r"visual\."),
    ("vision", r"visual\.ln_post\.(weight|bias)", "post_layernorm.{0}", None),
    ("vision", r"visual\.proj", "visual_projection.kernel", None),  # [width, embed]
    ("model", r"logit_scale", "logit_scale", None),
    ("model", r"input_resolution|context_length|vocab_size", None, None),  # ints in OpenAI's TorchScript archives
]

_TOWER_PREFIX = {"text": "text_model.", "vision": "vision_model.", "model": ""}


def clip_rules(table: list[_Row], tower: str) -> list[Rule]:
    """Rules for a whole `CLIPModel` (tower="model") or one tower ("text" / "vision"): the other tower's tensors
    (and CLIPModel-level ones) are known and dropped when loading a single tower."""
    rules = []
    for owner, pattern, target, transform in table:
        if tower != "model" and owner != tower:
            target, transform = None, None
        elif target is not None and tower == "model":
            prefix = _TOWER_PREFIX[owner]
            target = prefix + target if isinstance(target, str) else tuple(prefix + t for t in target)
        rules.append(Rule(pattern, target, transform))
    return rules


# ---- configs ------------------------------------------------------------------------------------------------------
def _hf_common(d: dict, source: str) -> dict:
    try:
        return dict(
            hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            hidden_act=d.get("hidden_act", "quick_gelu"), layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        )
    except KeyError as e:
        raise PosiError(f"{source}: config lacks {e.args[0]!r}") from None


def hf_text_config(d: dict, projection_dim: int | None, source: str, skip_last_layers: int = 0) -> CLIPTextConfig:
    eos = d.get("eos_token_id", 2)
    return CLIPTextConfig(
        vocab_size=d.get("vocab_size", 49408), max_positions=d.get("max_position_embeddings", 77),
        projection_dim=projection_dim,
        # HF: eos_token_id == 2 is the legacy config value meaning "pool at argmax(ids)"
        eos_token_id=None if eos == 2 else eos, skip_last_layers=skip_last_layers, **_hf_common(d, source),
    )


def hf_vision_config(d: dict, projection_dim: int | None, source: str) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32),
        num_channels=d.get("num_channels", 3), projection_dim=projection_dim, **_hf_common(d, source),
    )


def _architecture(cfg: dict) -> str:
    arch = (cfg.get("architectures") or [""])[0]
    if arch:
        return arch
    return {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel",
            "clip_vision_model": "CLIPVisionModel"}.get(cfg.get("model_type", ""), "")


def openai_config_from_state(state: Mapping[str, np.ndarray], hidden_act: str, source: str) -> CLIPConfig:
    """Infer a CLIPConfig from OpenAI/open_clip tensor shapes (heads = width // 64, the convention of the OpenAI
    and LAION ViT-B/L models; pass a config explicitly for others, e.g. ViT-H's vision tower with 80-wide heads)."""
    try:
        def layers(prefix):
            return len({k.split(".")[prefix.count(".") + 1] for k in state if k.startswith(prefix + "resblocks.")})

        conv = state["visual.conv1.weight"]
        v_width, patch = conv.shape[0], conv.shape[-1]
        grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        t_width = state["ln_final.weight"].shape[0]
        vision = CLIPVisionConfig(
            image_size=patch * grid, patch_size=patch, num_channels=conv.shape[1], hidden_size=v_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_layers=layers("visual.transformer."), num_heads=v_width // 64, hidden_act=hidden_act,
            projection_dim=state["visual.proj"].shape[1],
        )
        text = CLIPTextConfig(
            vocab_size=state["token_embedding.weight"].shape[0], hidden_size=t_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_layers=layers("transformer."), num_heads=t_width // 64,
            max_positions=state["positional_embedding"].shape[0], hidden_act=hidden_act,
            projection_dim=state["text_projection"].shape[1],
        )
    except KeyError as e:
        raise PosiError(f"{source}: not an OpenAI/open_clip CLIP checkpoint (no tensor {e.args[0]!r})") from None
    return CLIPConfig(text=text, vision=vision)


# ---- reading ------------------------------------------------------------------------------------------------------
def read_hf_folder_tensors(folder: str) -> dict[str, np.ndarray]:
    """model.safetensors (or a sharded safetensors index), else pytorch_model.bin."""
    if any(Path(folder).glob("*.safetensors")) or (Path(folder) / "model.safetensors.index.json").is_file():
        st = SafetensorsFolder(folder)
        return {k: st.get(k) for k in st.keys()}
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return read_torch_file(os.path.join(folder, "pytorch_model.bin"))
    raise PosiError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _hf_tower_prefix(state: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """transformers >= 5 saves CLIPTextModel / CLIPVisionModel without the `text_model.` / `vision_model.` prefix
    that older folders (e.g. every SD `text_encoder/` on the hub) have: restore it so one table serves both."""
    tower = {"CLIPTextModel": "text_model.", "CLIPVisionModel": "vision_model.",
             "CLIPTextModelWithProjection": "text_model.", "CLIPVisionModelWithProjection": "vision_model."}.get(arch)
    if tower is None or any(k.startswith(tower) for k in state):
        return state
    projections = ("text_projection.", "visual_projection.")
    return {k if k.startswith(projections) else tower + k: v for k, v in state.items()}


def _read_any(path: str):
    """-> (state, table, HF config dict or None, architecture) for an HF folder or an OpenAI/open_clip file."""
    if os.path.isdir(path):
        cfg = read_json(Path(path) / "config.json")
        arch = _architecture(cfg)
        return _hf_tower_prefix(read_hf_folder_tensors(path), arch), HF_TABLE, cfg, arch
    state = read_tensor_file(path)
    if any(k.startswith(("text_model.", "vision_model.")) for k in state):
        return state, HF_TABLE, None, ""
    return state, OPENAI_TABLE, None, "openai"


def _fill(factory, state: dict[str, np.ndarray], table: list[_Row], tower: str, source: str):
    return fill_abstract(nnx.eval_shape(factory), state.__getitem__, state.keys(), clip_rules(table, tower), source)


# ---- public loaders -----------------------------------------------------------------------------------------------
def load_clip(path: str, config: CLIPConfig | None = None, *, hidden_act: str = "quick_gelu",
              dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPModel:
    """Both towers. `path`: an HF CLIPModel folder, or an OpenAI/open_clip .safetensors/.pt/.bin file.
    For OpenAI-layout files without `config`, the config is inferred from shapes with `hidden_act`
    ("quick_gelu" for OpenAI's weights, "gelu" for open_clip's LAION weights)."""
    path = str(path)
    state, table, hf_cfg, arch = _read_any(path)
    if config is None:
        if hf_cfg is not None:
            if arch != "CLIPModel":
                raise PosiError(f"{path}: config.json describes {arch or 'an unknown model'}, not CLIPModel")
            proj = hf_cfg.get("projection_dim", 512)
            config = CLIPConfig(
                text=hf_text_config(hf_cfg.get("text_config", {}), proj, path),
                vision=hf_vision_config(hf_cfg.get("vision_config", {}), proj, path),
                logit_scale_init=hf_cfg.get("logit_scale_init_value", 2.6592),
            )
        elif table is OPENAI_TABLE:
            config = openai_config_from_state(state, hidden_act, path)
        else:
            raise PosiError(f"{path}: HF-layout tensors without config.json: pass `config`")
    return _fill(lambda: CLIPModel(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                 state, table, "model", path)


def load_clip_text(path: str, config: CLIPTextConfig | None = None, *, hidden_act: str = "quick_gelu",
                   skip_last_layers: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPTextTransformer:
    """The text tower alone, from an HF CLIPModel / CLIPTextModel(WithProjection) folder or an OpenAI file."""
    path = str(path)
    state, table, hf_cfg, arch = _read_any(path)
    if config is None:
        if hf_cfg is not None:
            if arch == "CLIPModel":
                config = hf_text_config(hf_cfg.get("text_config", {}), hf_cfg.get("projection_dim", 512), path,
                                        skip_last_layers)
            elif arch in ("CLIPTextModel", "CLIPTextModelWithProjection"):
                proj = hf_cfg.get("projection_dim", 512) if arch == "CLIPTextModelWithProjection" else None
                config = hf_text_config(hf_cfg, proj, path, skip_last_layers)
            else:
                raise PosiError(f"{path}: config.json describes {arch or 'an unknown model'}, not a CLIP text model")
        elif table is OPENAI_TABLE:
            config = dataclasses.replace(openai_config_from_state(state, hidden_act, path).text,
                                         skip_last_layers=skip_last_layers)
        else:
            raise PosiError(f"{path}: HF-layout tensors without config.json: pass `config`")
    return _fill(lambda: CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                 state, table, "text", path)


def load_clip_vision(path: str, config: CLIPVisionConfig | None = None, *, hidden_act: str = "quick_gelu",
                     dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPVisionTransformer:
    """The vision tower alone, from an HF CLIPModel / CLIPVisionModel(WithProjection) folder or an OpenAI file."""
    path = str(path)
    state, table, hf_cfg, arch = _read_any(path)
    if config is None:
        if hf_cfg is not None:
            if arch == "CLIPModel":
                config = hf_vision_config(hf_cfg.get("vision_config", {}), hf_cfg.get("projection_dim", 512), path)
            elif arch in ("CLIPVisionModel", "CLIPVisionModelWithProjection"):
                proj = hf_cfg.get("projection_dim", 512) if arch == "CLIPVisionModelWithProjection" else None
                config = hf_vision_config(hf_cfg, proj, path)
            else:
                raise PosiError(f"{path}: config.json describes {arch or 'an unknown model'}, not a CLIP vision model")
        elif table is OPENAI_TABLE:
            config = openai_config_from_state(state, hidden_act, path).vision
        else:
            raise PosiError(f"{path}: HF-layout tensors without config.json: pass `config`")
    return _fill(lambda: CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                 state, table, "vision", path)


def load_clip_text_encoder(folder: str, dtype=jnp.float32, *, param_dtype=None,
                           skip_last_layers: int = 0) -> CLIPTextTransformer:
    """Stable Diffusion's `text_encoder/` (HF CLIPTextModel: config.json + model.safetensors or .bin).
    `skip_last_layers` is diffusers' `clip_skip` (1 = penultimate layer, then the final LayerNorm)."""
    if not os.path.isdir(folder):
        raise PosiError(f"{folder}: text encoder folder not found")
    return load_clip_text(folder, skip_last_layers=skip_last_layers, dtype=dtype,
                          param_dtype=dtype if param_dtype is None else param_dtype)
