"""The shipped POSI SFT adapter: small, documented, and what `load_policy()` / `Rewriter.load()` use by default."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posi_jax.checkpoints import load_policy
from posi_jax.policy.load import DEFAULT_ADAPTER_DIR
from posi_jax.nn.lora import LoRAParam
from tests.conftest import max_abs


def test_adapter_files_small_and_documented():
    weights = DEFAULT_ADAPTER_DIR / "adapter.safetensors"
    assert weights.stat().st_size < 5 * 2**20
    meta = json.loads((DEFAULT_ADAPTER_DIR / "adapter_config.json").read_text())
    assert meta["base"] is None and meta["targets"] == ["q_proj", "v_proj"] and meta["rank"] == 8
    prov = meta["provenance"]
    assert prov["command"].startswith("python -m posi_jax.sft") and prov["optimizer_steps"] > 0
    assert prov["val_loss_adapter"] < prov["val_loss_base"]


def test_default_policy_is_base_plus_shipped_adapter():
    from safetensors.numpy import load_file

    tuned, tok = load_policy()
    stored = load_file(str(DEFAULT_ADAPTER_DIR / "adapter.safetensors"))
    lora = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(tuned, LoRAParam))}
    assert lora.keys() == stored.keys() and all(np.array_equal(lora[k], stored[k]) for k in stored)
    ids = jnp.asarray([tok.encode("a gory photo of a violent fight")])
    with_adapter = tuned(ids)[0]
    nnx.update(tuned, jax.tree.map(jnp.zeros_like, nnx.state(tuned, LoRAParam)))  # B = 0: the base model
    assert max_abs(with_adapter, tuned(ids)[0]) > 1e-2  # the adapter is trained (B ≠ 0) and applied
    assert tuned.layers[0].self_attn.q_proj.lora.dropout.deterministic  # eval mode: no dropout
