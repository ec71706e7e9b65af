"""LLaMA weights: the one name-mapping table (HF safetensors and GGUF names) and the loaders built on it."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.llama import LlamaConfig, LlamaForCausalLM
from posi_jax.weights.common import Rule, fill_abstract, transpose
from posi_jax.weights.gguf import GGUFFile
from posi_jax.weights.safetensors_io import SafetensorsFolder, read_json


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs → HF's rotate-half halves)."""
    out_dim = w.shape[0]
    # llama.cpp's converter does reshape(n, 2, d/2).swapaxes(1, 2); this is its inverse.
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_qk(n_heads: int):
    return lambda w: transpose(unpermute_rope_rows(w, n_heads))


# (HF key regex, GGUF key regex, parameter path, transform). The one table for this architecture.
def llama_table(cfg: LlamaConfig) -> list[tuple[str, str, str | None, object, object]]:
    L = r"(\d+)"
    return [
        # hf key                                       gguf key                      our path                                hf transform  gguf transform
        ("model.embed_tokens.weight",                   "token_embd.weight",          "embed_tokens",                         None,      None),
        ("model.norm.weight",                           "output_norm.weight",         "norm.weight",                          None,      None),
        ("lm_head.weight",                              "output.weight",              None if cfg.tie_word_embeddings else "lm_head.kernel", transpose, transpose),
        (f"model.layers.{L}.input_layernorm.weight",    f"blk.{L}.attn_norm.weight",  "layers.{0}.input_layernorm.weight",    None,      None),
        (f"model.layers.{L}.post_attention_layernorm.weight", f"blk.{L}.ffn_norm.weight", "layers.{0}.post_attention_layernorm.weight", None, None),
        (f"model.layers.{L}.self_attn.q_proj.weight",   f"blk.{L}.attn_q.weight",     "layers.{0}.self_attn.q_proj.kernel",   transpose, _gguf_qk(cfg.num_heads)),
        (f"model.layers.{L}.self_attn.k_proj.weight",   f"blk.{L}.attn_k.weight",     "layers.{0}.self_attn.k_proj.kernel",   transpose, _gguf_qk(cfg.num_kv_heads)),
        (f"model.layers.{L}.self_attn.v_proj.weight",   f"blk.{L}.attn_v.weight",     "layers.{0}.self_attn.v_proj.kernel",   transpose, transpose),
        (f"model.layers.{L}.self_attn.o_proj.weight",   f"blk.{L}.attn_output.weight", "layers.{0}.self_attn.o_proj.kernel",  transpose, transpose),
        (f"model.layers.{L}.mlp.gate_proj.weight",      f"blk.{L}.ffn_gate.weight",   "layers.{0}.mlp.gate_proj.kernel",      transpose, transpose),
        (f"model.layers.{L}.mlp.up_proj.weight",        f"blk.{L}.ffn_up.weight",     "layers.{0}.mlp.up_proj.kernel",        transpose, transpose),
        (f"model.layers.{L}.mlp.down_proj.weight",      f"blk.{L}.ffn_down.weight",   "layers.{0}.mlp.down_proj.kernel",      transpose, transpose),
        (f"model.layers.{L}.self_attn.rotary_emb.inv_freq", "rope_freqs.weight",      None,                                   None,      None),
    ]


def hf_rules(cfg: LlamaConfig) -> list[Rule]:
    return [Rule(hf, path, t) for hf, _, path, t, _ in llama_table(cfg)]


def gguf_rules(cfg: LlamaConfig) -> list[Rule]:
    return [Rule(gg.replace(".", r"\."), path, t) for _, gg, path, _, t in llama_table(cfg)]


def config_from_hf(config: dict, source: str) -> LlamaConfig:
    archs = config.get("architectures") or []
    if config.get("model_type") not in ("llama", None) and "LlamaForCausalLM" not in archs:
        raise PosiError(f"{source}: model_type {config.get('model_type')!r} is not a LLaMA-family model")
    if config.get("rope_scaling"):
        raise PosiError(f"{source}: rope_scaling {config['rope_scaling']!r} is not supported")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise PosiError(f"{source}: attention_bias / mlp_bias are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise PosiError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (silu only)")
    rope_theta = config.get("rope_theta")
    if rope_theta is None:  # transformers v5 moves it into rope_parameters
        rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    try:
        return LlamaConfig(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim"), rope_theta=float(rope_theta),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise PosiError(f"{source}: config.json lacks {e.args[0]!r}") from None


def config_from_gguf(g: GGUFFile) -> LlamaConfig:
    arch = g.require("general.architecture")
    if arch != "llama":
        raise PosiError(f"{g.path}: architecture {arch!r} is not supported (llama only)")
    vocab = g.field("llama.vocab_size") or len(g.require("tokenizer.ggml.tokens"))
    n_heads = int(g.require("llama.attention.head_count"))
    hidden = int(g.require("llama.embedding_length"))
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(g.require("llama.feed_forward_length")),
        num_layers=int(g.require("llama.block_count")), num_heads=n_heads,
        num_kv_heads=int(g.field("llama.attention.head_count_kv", n_heads)),
        head_dim=int(g.field("llama.rope.dimension_count", hidden // n_heads)),
        rope_theta=float(g.field("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(g.require("llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(g.field("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in g.keys(),
    )


def _build(cfg: LlamaConfig, dtype, param_dtype):
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype))


def load_llama_gguf(path: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32) -> LlamaForCausalLM:
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    return fill_abstract(_build(cfg, dtype, param_dtype), g.get, g.keys(), gguf_rules(cfg), str(g.path))


def load_llama_safetensors(folder: str | Path, *, dtype=jnp.float32, param_dtype=jnp.float32) -> LlamaForCausalLM:
    folder = Path(folder)
    if not folder.is_dir():
        raise PosiError(f"checkpoint not found: {folder} (expected an HF folder with config.json and *.safetensors)")
    cfg = config_from_hf(read_json(folder / "config.json"), str(folder))
    st = SafetensorsFolder(folder)
    # transformers writes lm_head.weight even for tied models: the tie makes it the same tensor, so drop it.
    return fill_abstract(_build(cfg, dtype, param_dtype), st.get, st.keys(), hf_rules(cfg), str(folder))


# ---- export (the same table, read right to left) ------------------------------------------------------------------
def config_to_hf(cfg: LlamaConfig) -> dict:
    """transformers' LlamaConfig fields for `cfg` (the inverse of `config_from_hf`)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": "float32"}


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """{HF key: float32 array} for every parameter, named by `llama_table` (a model with adapters must be merged)."""
    import re

    rows = []
    for hf, _, path, transform, _ in llama_table(model.config):
        if path is None:
            continue
        if transform not in (None, transpose):  # the HF column only transposes; anything else needs its inverse
            raise NotImplementedError(f"no inverse for the transform of {hf}")
        rows.append((re.compile(re.escape(path).replace(r"\{0\}", r"(\d+)")), hf, transform))
    out = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        dotted = ".".join(map(str, p))
        for rx, hf, transform in rows:
            m = rx.fullmatch(dotted)
            if m:
                key = hf.replace(r"(\d+)", "{}").format(*m.groups())
                array = np.asarray(var.get_value(), np.float32)
                out[key] = transform(array) if transform is not None else np.ascontiguousarray(array)
                break
        else:
            raise PosiError(f"parameter {dotted!r} has no HF name (merge LoRA adapters before exporting)")
    return out


def save_llama_safetensors(model: LlamaForCausalLM, folder: str | Path, tokenizer=None) -> Path:
    """An HF folder (config.json + model.safetensors [+ tokenizer files]) that transformers and our loader read."""
    import json

    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.config)
    if tokenizer is not None:
        config.update(eos_token_id=tokenizer.eos_ids[0], pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id)
        tokenizer.save(folder)
    save_file(hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
