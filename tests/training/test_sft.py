"""SFT on a small random LLaMA: fresh LoRA == base, training lowers the loss, interrupted + resumed == uninterrupted,
merged == base + adapter, the HF export loads in transformers with the same logits, adapters and run folders load as
policies, and config errors are reported."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posi_jax.checkpoints import load_policy
from posi_jax.policy.load import load_base_policy
from posi_jax.config import load_config
from posi_jax.errors import PosiError
from posi_jax.nn.lora import LoRAParam, add_lora, merge_lora
from posi_jax.training.sft import SFTConfig, SFTTrainer, load_run_model
from tests.conftest import REPO, max_abs

IDS = jnp.asarray(np.random.default_rng(0).integers(3, 49152, (2, 19)))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, data_dir):
    records = json.loads((data_dir / "sft_toxic_clean.json").read_text())[:36]
    path = tmp_path_factory.mktemp("sft_data") / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def tiny_cfg(base, data, out_dir, *extra) -> SFTConfig:
    # cutoff 64 + pad_multiple 64: every batch has one shape, so each trainer compiles its step once
    return load_config(SFTConfig, None, [f"base={base}", f"data={data}", f"out_dir={out_dir}", "batch_size=4",
                                         "grad_accum=2", "max_steps=4", "cutoff_len=64", "pad_multiple=64",
                                         "val_size=4", "learning_rate=1e-2", "warmup_steps=1", "save_every=2",
                                         "progress=false", *extra])


@pytest.fixture(scope="module")
def trained(tiny_llama_folder, sft_data, tmp_path_factory):
    """An uninterrupted 4-step LoRA run (dropout on)."""
    out = tmp_path_factory.mktemp("run_full")
    trainer = SFTTrainer(tiny_cfg(tiny_llama_folder, sft_data, out))
    summary = trainer.run()
    return trainer, summary, out


def test_fresh_lora_equals_base(tiny_llama_folder):
    model, _ = load_base_policy(tiny_llama_folder)
    base = model(IDS)[0]
    add_lora(model, ("q_proj", "v_proj"), rank=8, alpha=16, dropout=0.1)
    assert len(jax.tree.leaves(nnx.state(model, LoRAParam))) == 2 * 2 * 2  # 2 layers × q,v × A,B
    model.eval()
    assert max_abs(model(IDS)[0], base) == 0.0
    model.train()  # dropout on: B = 0 still makes the adapter's contribution exactly zero
    assert max_abs(model(IDS)[0], base) == 0.0


def test_steps_lower_loss_on_fixed_batch(tiny_llama_folder, sft_data, tmp_path):
    trainer = SFTTrainer(tiny_cfg(tiny_llama_folder, sft_data, tmp_path, "grad_accum=1", "lora_dropout=0.0"))
    batch = trainer.epoch_batches(0)[0]
    before = trainer.batch_loss(batch)
    for _ in range(6):
        trainer.step(batch)
    after = trainer.batch_loss(batch)
    assert after < before - 0.1, (before, after)


def test_run_writes_metrics_and_validation(trained):
    trainer, summary, out = trained
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens"] > 0 and np.isfinite(r["loss"]) and r["lr"] >= 0 for r in steps)
    assert summary["step"] == 4 and np.isfinite(summary["val_loss"]) and np.isfinite(summary["val_loss_start"])
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_interrupt_then_resume_equals_uninterrupted(trained, tiny_llama_folder, sft_data, tmp_path):
    trainer, _, _ = trained
    cfg = tiny_cfg(tiny_llama_folder, sft_data, tmp_path)
    first = SFTTrainer(cfg)
    first.run(stop_after_step=2)  # "killed" after optimizer step 2: only the step-2 checkpoint survives
    with pytest.raises(PosiError, match="already holds checkpoints"):
        SFTTrainer(cfg).run()
    resumed = SFTTrainer(cfg)
    summary = resumed.run(resume=True)
    assert summary["step"] == 4
    for name in ("trainable", "opt_state"):
        diffs = jax.tree.map(lambda a, b: max_abs(a, b), getattr(trainer, name), getattr(resumed, name))
        assert max(jax.tree.leaves(diffs)) <= 1e-6, name
    with pytest.raises(PosiError, match="learning_rate changed"):
        SFTTrainer(tiny_cfg(tiny_llama_folder, sft_data, tmp_path, "learning_rate=0.5")).run(resume=True)


def test_resume_logs_each_step_once(trained, tiny_llama_folder, sft_data, tmp_path):
    """A run killed after logging step 3 but before checkpointing it resumes from step 2: metrics.jsonl ends with each
    step once, the redone step 3 as the uninterrupted run logged it."""
    import shutil

    _, _, full_dir = trained
    cfg = tiny_cfg(tiny_llama_folder, sft_data, tmp_path)
    SFTTrainer(cfg).run(stop_after_step=3)
    shutil.rmtree(tmp_path / "checkpoints" / "3")  # the kill came before step 3's checkpoint was written
    SFTTrainer(cfg).run(resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in rows] == [(r["step"], "loss" in r) for r in full] == [
        (0, False), (1, True), (2, True), (3, True), (4, True), (4, False)]
    for got, want in zip(rows, full):
        assert got.get("loss") == pytest.approx(want.get("loss"), abs=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama_folder, sft_data, tmp_path):
    """A learning rate far too high (1e38) overflows the adapter: the run stops with one error naming the step, saves
    nothing after the last finite step, and logs no NaN (metrics.jsonl stays JSON)."""
    from posi_jax.training import checkpointing

    cfg = tiny_cfg(tiny_llama_folder, sft_data, tmp_path, "learning_rate=1e38", "save_every=1")
    with pytest.raises(PosiError, match=r"step (\d+): the training loss or gradient became non-finite") as error:
        SFTTrainer(cfg).run()
    bad_step = int(error.value.args[0].split(":")[0].split()[1])
    assert bad_step >= 2 and f"the last good checkpoint, step {bad_step - 1}, is kept" in str(error.value)
    assert checkpointing.latest_step(tmp_path) == bad_step - 1
    rows = [json.loads(line, parse_constant=pytest.fail) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, bad_step))
    restored = load_run_model(tmp_path)[0]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(nnx.state(restored, LoRAParam)))


def test_merged_equals_base_plus_adapter_and_hf_export(trained, tmp_path):
    from transformers import LlamaForCausalLM as TorchLlama
    import torch

    from posi_jax.weights.llama import load_llama_safetensors, save_llama_safetensors

    trainer, _, out = trained
    model = trainer.merged_model()
    model.eval()
    with_adapter = model(IDS)[0]
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(nnx.state(model, LoRAParam))) > 0
    merged = merge_lora(nnx.clone(model))
    err = max_abs(merged(IDS)[0], with_adapter)
    assert err <= 1e-4, err
    save_llama_safetensors(merged, tmp_path / "hf", trainer.tokenizer)
    ref = TorchLlama.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(np.asarray(IDS))).logits.numpy()
    assert max_abs(want, with_adapter) <= 1e-4
    assert max_abs(load_llama_safetensors(tmp_path / "hf")(IDS)[0], merged(IDS)[0]) <= 1e-6


def test_adapter_and_run_dirs_load_as_policies(trained):
    trainer, _, out = trained
    model = trainer.merged_model()
    model.eval()
    want = model(IDS)[0]
    size = (out / "adapter" / "adapter.safetensors").stat().st_size
    assert size < 64 * 1024  # adapter-only: the base weights are not in it
    for checkpoint in (out / "adapter", out):
        policy, tok = load_policy(checkpoint)
        assert max_abs(policy(IDS)[0], want) <= 1e-6, checkpoint
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["rank"] == 8 and meta["targets"] == ["q_proj", "v_proj"] and meta["step"] == 4


def test_full_finetune_trains_every_parameter(tiny_llama_folder, sft_data, tmp_path):
    trainer = SFTTrainer(tiny_cfg(tiny_llama_folder, sft_data, tmp_path, "finetune=full", "grad_accum=1",
                                  "learning_rate=1e-3", "warmup_steps=0"))
    before = jax.tree.map(np.asarray, trainer.trainable)
    trainer.step(trainer.epoch_batches(0)[0])
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, trainer.trainable)
    assert all(jax.tree.leaves(changed)) and not jax.tree.leaves(nnx.state(trainer.model, LoRAParam))


def test_config_errors(tmp_path):
    with pytest.raises(PosiError, match="unknown config key.*lora_rnak"):
        load_config(SFTConfig, None, ["lora_rnak=4"])
    with pytest.raises(PosiError, match="finetune"):
        load_config(SFTConfig, None, ["finetune=partial"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("learning_rate: 1e-4\nbatch_sise: 2\n")
    proc = subprocess.run([sys.executable, "-m", "posi_jax.sft", "--config", str(yaml_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown config key(s) batch_sise"), proc.stderr


def test_cli_train_then_merge(tiny_llama_folder, sft_data, tmp_path):
    from transformers import LlamaForCausalLM as TorchLlama
    import torch

    out = tmp_path / "run"
    args = [f"base={tiny_llama_folder}", f"data={sft_data}", f"out_dir={out}", "batch_size=4", "grad_accum=1",
            "max_steps=2", "cutoff_len=64", "pad_multiple=64", "val_size=4", "progress=false"]
    proc = subprocess.run([sys.executable, "-m", "posi_jax.sft", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["step"] == 2
    proc = subprocess.run([sys.executable, "-m", "posi_jax.sft", "merge", str(out / "adapter"), "--out",
                           str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    policy, _ = load_policy(out / "adapter")
    ref = TorchLlama.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(np.asarray(IDS))).logits.numpy()
    assert max_abs(want, policy(IDS)[0]) <= 1e-4
