"""LLaMA loaders: GGUF for every quant type we support (transformers' GGUF loader as the oracle), HF safetensors
folders written by transformers, no torch at load time, and one-line errors for broken checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from posi_jax.errors import PosiError
from posi_jax.weights.llama import load_llama_gguf, load_llama_safetensors, unpermute_rope_rows
from tests.conftest import REPO, max_abs

CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
           tie_word_embeddings=False)
_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w, n_heads):  # what llama.cpp's converter does to q/k rows
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, state_dict, qtype_name):
    """Write a HF LLaMA state dict as llama.cpp would: GGUF names, permuted q/k, 2-D weights in `qtype_name`."""
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(CFG["max_position_embeddings"]); w.add_embedding_length(CFG["hidden_size"])
    w.add_block_count(CFG["num_hidden_layers"]); w.add_feed_forward_length(CFG["intermediate_size"])
    w.add_head_count(CFG["num_attention_heads"]); w.add_head_count_kv(CFG["num_key_value_heads"])
    w.add_layer_norm_rms_eps(CFG["rms_norm_eps"]); w.add_rope_freq_base(CFG["rope_theta"])
    w.add_vocab_size(CFG["vocab_size"])
    w.add_rope_dimension_count(CFG["hidden_size"] // CFG["num_attention_heads"])
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, value in state_dict.items():
        if key in top:
            name = top[key]
        else:
            layer, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
            name = f"blk.{layer}.{_GGUF_NAMES[rest]}.weight"
        value = value.astype(np.float32)
        if ".attn_q." in name:
            value = _llama_cpp_permute(value, CFG["num_attention_heads"])
        if ".attn_k." in name:
            value = _llama_cpp_permute(value, CFG["num_key_value_heads"])
        if value.ndim == 2 and qtype_name != "F32":
            if qtype_name == "F16":
                w.add_tensor(name, value.astype(np.float16))
            else:
                q = gguf.quants.quantize(value, qtype)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture(scope="module")
def tiny_torch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quant_types_match_transformers(tmp_path, tiny_torch, qtype):
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "m.gguf", {k: v.numpy() for k, v in tiny_torch.state_dict().items()}, qtype)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ours = load_llama_gguf(tmp_path / "m.gguf")
    ids = np.arange(3, 40)[None]
    with torch.no_grad():
        want = oracle(torch.tensor(ids)).logits.numpy()
    err = max_abs(ours(jnp.asarray(ids))[0], want)
    assert err <= 1e-4, (qtype, err)
    if qtype == "F32":  # lossless: our weights equal the original torch ones (permutation undone correctly)
        q = tiny_torch.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy().T
        assert max_abs(ours.layers[1].self_attn.q_proj.kernel[...], q) == 0.0


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    assert np.array_equal(unpermute_rope_rows(_llama_cpp_permute(w, 3), 3), w)


def test_smollm2_gguf_holds_the_types_we_read(smollm2_gguf):
    from posi_jax.weights.gguf import GGUFFile

    g = GGUFFile(smollm2_gguf)
    assert {g.tensor_type(k) for k in g.keys()} == {"F32", "Q8_0", "Q4_1"}


def test_safetensors_folder_written_by_transformers(tiny_llama_folder):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tiny_llama_folder, dtype=torch.float32).eval()
    ours = load_llama_safetensors(tiny_llama_folder)
    ids = np.arange(5, 30)[None]
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    assert max_abs(ours(jnp.asarray(ids))[0], want) <= 1e-4


def test_sharded_safetensors_folder(tmp_path, tiny_torch):
    tiny_torch.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_llama_safetensors(tmp_path)
    assert max_abs(ours.lm_head.kernel[...], tiny_torch.lm_head.weight.detach().numpy().T) == 0.0


def test_loaders_do_not_import_torch(tmp_path, tiny_llama_folder, tiny_torch):
    write_tiny_gguf(tmp_path / "m.gguf", {k: v.numpy() for k, v in tiny_torch.state_dict().items()}, "Q8_0")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises
        "from posi_jax.checkpoints import load_policy\n"
        "from posi_jax.weights.llama import load_llama_gguf\n"
        f"load_llama_gguf({str(tmp_path / 'm.gguf')!r}); load_policy({str(tiny_llama_folder)!r})\n"
        "assert sys.modules['torch'] is None; print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_corrupt_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 7 + b"garbage")
    with pytest.raises(PosiError, match="not a readable GGUF"):
        load_llama_gguf(bad)
    with pytest.raises(PosiError, match="checkpoint not found"):
        load_llama_gguf(tmp_path / "nope.gguf")
    with pytest.raises(PosiError, match="config.json"):
        (tmp_path / "folder").mkdir()
        load_llama_safetensors(tmp_path / "folder")


def test_wrong_shape_names_the_tensor(tmp_path, tiny_llama_folder):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_folder / "config.json").read_text())
    tensors = load_file(str(tiny_llama_folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((7, 64), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(PosiError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(7, 64\).*\(64, 128\)"):
        load_llama_safetensors(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros((3,), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(PosiError, match="unexpected tensor.*mlp.extra"):
        load_llama_safetensors(folder)


def test_unsupported_config_is_rejected(tmp_path, tiny_llama_folder):
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = json.loads((tiny_llama_folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PosiError, match="rope_scaling"):
        load_llama_safetensors(folder)
