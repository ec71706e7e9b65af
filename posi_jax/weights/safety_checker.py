"""The SD safety checker's checkpoint (a diffusers SD folder's `safety_checker/`, HF layout) and its feature extractor
(`feature_extractor/preprocessor_config.json`) -> `posi_jax.models.safety_checker.StableDiffusionSafetyChecker`.

The vision tower's rows are weights/clip.py's HF table (the checker holds an HF `CLIPVisionModel` and a top-level
`visual_projection`, as `CLIPVisionModelWithProjection` does); the checker adds its concept embeddings and thresholds.
Checkpoints written by transformers < 5 nest the tower one level deeper (`vision_model.vision_model.`); the extra
level is dropped before the table is applied, so one table serves both.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.safety_checker import SafetyCheckerConfig, StableDiffusionSafetyChecker
from posi_jax.weights.clip import HF_TABLE, clip_rules, hf_vision_config, read_hf_folder_tensors
from posi_jax.weights.common import Rule, fill_abstract
from posi_jax.weights.safetensors_io import read_json

# The vision tower's rules with targets under `vision_model.` (clip_rules for a whole CLIPModel prefixes them so).
_VISION_RULES = [rule for row, rule in zip(HF_TABLE, clip_rules(HF_TABLE, "model")) if row[0] == "vision"]

SAFETY_CHECKER_TABLE: list[Rule] = _VISION_RULES + [
    Rule(r"concept_embeds", "concept_embeds"),
    Rule(r"special_care_embeds", "special_care_embeds"),
    # the reference names the thresholds "weights": each is subtracted from its cosine
    Rule(r"concept_embeds_weights", "concept_thresholds"),
    Rule(r"special_care_embeds_weights", "special_care_thresholds"),
]

_NESTED = "vision_model.vision_model."


def _flatten_tower_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {("vision_model." + k[len(_NESTED):] if k.startswith(_NESTED) else k): v for k, v in state.items()}


def _size(value, what: str, source: Path) -> int:
    """`size` / `crop_size` of a preprocessor config: an int (old CLIPFeatureExtractor files, e.g. SD v1.4's) or a
    dict with shortest_edge, or height == width."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") is not None and value.get("height") == value.get("width"):
            return int(value["height"])
    raise PosiError(f"{source}: {what}={value!r} is not supported (an int, shortest_edge, or equal height and width)")


def read_feature_extractor(path: str | Path, image_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std) of a CLIPImageProcessor config, checked to be the preprocessing we run on device
    (`reward/preprocess.clip_preprocess`): bicubic resize of the shortest side to the checker's input size, a centre
    crop of that size, rescale by 1/255, normalise."""
    path = Path(path)
    source = path / "preprocessor_config.json" if path.is_dir() else path
    cfg = read_json(source)
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if cfg.get(flag, True) is not True:
            raise PosiError(f"{source}: {flag}={cfg[flag]!r} is not supported (true)")
    if cfg.get("resample", 3) != 3:
        raise PosiError(f"{source}: resample={cfg['resample']!r} is not supported (3, bicubic)")
    if not np.isclose(cfg.get("rescale_factor", 1 / 255), 1 / 255):
        raise PosiError(f"{source}: rescale_factor={cfg['rescale_factor']!r} is not supported (1/255)")
    size, crop = _size(cfg.get("size", image_size), "size", source), _size(cfg.get("crop_size", image_size),
                                                                          "crop_size", source)
    if size != image_size or crop != image_size:
        raise PosiError(f"{source}: resize {size} and crop {crop} must both be the checker's input size {image_size}")
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3):
        raise PosiError(f"{source}: image_mean and image_std must be lists of 3 numbers, got {mean!r} and {std!r}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_safety_checker(checker_folder: str | Path, feature_extractor: str | Path, *, dtype=jnp.float32,
                        param_dtype=None) -> StableDiffusionSafetyChecker:
    """The checker from its HF folder (config.json: a CLIPConfig; model.safetensors or pytorch_model.bin) and the
    feature extractor's folder or preprocessor_config.json."""
    folder = Path(checker_folder)
    if not folder.is_dir():
        raise PosiError(f"{folder}: safety checker folder not found")
    hf = read_json(folder / "config.json")
    # configs saved by transformers 4.x (SD v1.x folders) may also carry `vision_config_dict`, which CLIPConfig lets
    # override `vision_config`
    vision_dict = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
    vision = hf_vision_config(vision_dict, hf.get("projection_dim", 512), str(folder / "config.json"))
    mean, std = read_feature_extractor(feature_extractor, vision.image_size)
    cfg = SafetyCheckerConfig(vision=vision, image_mean=mean, image_std=std)
    state = _flatten_tower_prefix(read_hf_folder_tensors(str(folder)))
    pd = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: StableDiffusionSafetyChecker(cfg, dtype=dtype, param_dtype=pd,
                                                                   rngs=nnx.Rngs(0)))
    return fill_abstract(abstract, state.__getitem__, state.keys(), SAFETY_CHECKER_TABLE, str(folder))
