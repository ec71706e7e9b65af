"""Supervised fine-tuning on POSI toxic→clean pairs: LoRA or full fine-tuning, one jitted train step.

The model state is split three ways: `trainable` (the LoRA parameters, or every parameter for full fine-tuning),
`rng` (the dropout keys) and `frozen` (the rest). One jitted step takes a micro-batch, computes the response-only
token-mean cross entropy in fp32 and hands the gradient to optax (AdamW, warmup + cosine, clip by global norm) wrapped
in `optax.MultiSteps`, which applies an update every `grad_accum` micro-batches. The data order is a pure function of
(seed, epoch), so a checkpoint (trainable, optimizer state, dropout keys, step) resumes exactly.

Run layout: `out_dir/sft_config.json`, `out_dir/metrics.jsonl` (+ TensorBoard events, training/metrics.py),
`out_dir/checkpoints/<step>/` (orbax; with LoRA only the adapter and its optimizer state), and at the end
`out_dir/adapter/` (LoRA) — the folder `load_policy` accepts.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from posi_jax.config import DTYPES, changed_keys, check_numbers, parse_dtype, read_json, read_json_config, to_dict
from posi_jax.data.batches import Batch, bucketed_batches
from posi_jax.data.posi import load_posi_records, split_records
from posi_jax.errors import PosiError
from posi_jax.nn.lora import LoRAParam, add_lora
from posi_jax.policy.adapters import save_adapter
from posi_jax.policy.chat import check_template, encode_examples, template_of, use_template
from posi_jax.policy.load import load_base_policy
from posi_jax.nn import sharding as shd
from posi_jax.training import checkpointing, distributed
from posi_jax.training.metrics import MetricsWriter
SFT_RUN_CONFIG = "sft_config.json"  # what marks an SFT run folder
# Fields that may change between a run and its resumption (they do not affect the numbers).
_RESUME_MAY_CHANGE = {"progress", "save_every", "keep_checkpoints", "eval_every", "out_dir", "distributed"}


@dataclass(frozen=True)
class SFTConfig:
    base: str | None = None  # policy checkpoint (.gguf / HF folder); None: the embedded SmolLM2-135M-Instruct GGUF
    # prompt format (posi_jax.policy.chat): auto (the base's chat template; LLaMA-Factory's `default` template when it
    # has none, as a base LLaMA-7B) | chat | default. Recorded in the adapter, so inference uses the same one.
    template: str = "auto"
    data: str = "posi:sft_toxic_clean.json"  # POSI JSON: a path, posi:NAME or a URL (posi_jax.data.posi resolver)
    cache_dir: str | None = None  # where posi:NAME / URLs are cached (default: $POSI_JAX_CACHE or ~/.cache/posi_jax)
    out_dir: str = "runs/sft"
    finetune: str = "lora"  # "lora" | "full"
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    epochs: int = 3
    max_steps: int = 0  # optimizer steps; 0: `epochs` full epochs
    cutoff_len: int = 1024
    val_size: int = 100  # held-out records (deterministic split)
    split_seed: int = 0
    seed: int = 0  # data order and LoRA init / dropout
    pad_multiple: int = 32  # sequence lengths are padded to a multiple of this (few shapes → few compilations)
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    eval_every: int = 0  # optimizer steps between validations (0: at the start and the end only)
    save_every: int = 100  # optimizer steps between checkpoints (and always at the end)
    keep_checkpoints: int = 2
    progress: bool = True
    # Join a multi-host run first (training/distributed.py; also when JAX_NUM_PROCESSES is set). Every micro-batch is
    # split by rows over all devices of all processes (data parallel, parameters replicated), so batch_size must be a
    # multiple of the device count.
    distributed: bool = False

    BOUNDS: ClassVar[dict[str, str]] = {
        "lora_rank": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)", "learning_rate": "[0, inf)",
        "warmup_steps": "[0, inf)", "weight_decay": "[0, inf)", "max_grad_norm": "(0, inf)", "batch_size": "[1, inf)",
        "grad_accum": "[1, inf)", "epochs": "[0, inf)", "max_steps": "[0, inf)", "cutoff_len": "[1, inf)",
        "val_size": "[0, inf)", "split_seed": "[0, inf)", "seed": "[0, inf)", "pad_multiple": "[1, inf)",
        "eval_every": "[0, inf)", "save_every": "[1, inf)", "keep_checkpoints": "[1, inf)"}

    def __post_init__(self):
        check_numbers(self, "")
        check_template(self.template, "config key 'template'")
        if self.finetune not in ("lora", "full"):
            raise PosiError(f"config key 'finetune': expected 'lora' or 'full', got {self.finetune!r}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise PosiError(f"config key {name!r}: expected one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.epochs < 1 and self.max_steps < 1:
            raise PosiError("set epochs ≥ 1 or max_steps ≥ 1")


def num_loss_targets(loss_mask, minimum: int = 64) -> int:
    """The static row count `response_nll` needs for a batch: its number of predicted positions (loss_mask[:, 1:])
    rounded up to a power of two times `minimum`, at most B·T. Powers of two keep the distinct counts, and so the
    compilations, few (on the POSI pairs with the CPU config: 9 step shapes instead of 4, with a third of the rows)."""
    loss_mask = np.asarray(loss_mask)
    count, rows = int(loss_mask[:, 1:].sum()), minimum
    while rows < count:
        rows *= 2
    return min(rows, loss_mask.size)


def response_nll(head, hidden: jax.Array, ids: jax.Array, loss_mask: jax.Array,
                 num_targets: int) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(ids[t] | ids[:t]) over positions with loss_mask[t], number of such positions), in fp32.

    `hidden` [B, T, D] are the final hidden states and `head` maps [N, D] to logits [N, V]. The head runs only at the
    positions whose next token is a response token, gathered into `num_targets` rows (at least their count: see
    `num_loss_targets`; spare rows are masked out). The loss reads no other logits: on the POSI pairs those are about
    a fifth of a batch's padded positions, and the LM head is the model's widest matmul. Each row's NLL is
    logsumexp(logits) - logit[target], so no [N, V] log-probabilities are materialised."""
    b, t, d = hidden.shape
    predicts = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).reshape(b * t)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1).reshape(b * t)
    (rows,) = jnp.nonzero(predicts, size=num_targets, fill_value=0)
    valid = (jnp.arange(num_targets) < jnp.sum(predicts)).astype(jnp.float32)
    logits = head(hidden.reshape(b * t, d)[rows]).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[rows][:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return jnp.sum(nll * valid), jnp.sum(valid)


def make_optimizer(cfg: SFTConfig, total_steps: int):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(total_steps, cfg.warmup_steps + 1), end_value=0.0)
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay))
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum), schedule


def make_train_step(graphdef, tx):
    """The jitted micro-batch step over a model split as (graphdef, trainable, rng, frozen):
    (trainable, rng, opt_state, frozen, ids, attention_mask, loss_mask, num_targets) -> (trainable, rng, opt_state,
    metrics), with the static `num_targets` from `num_loss_targets(loss_mask)`."""

    def train_step(trainable, rng, opt_state, frozen, ids, attention_mask, loss_mask, num_targets):
        def loss_fn(params, rng, frozen):  # copy=True: fresh Variables in this trace (dropout updates its key count)
            model = nnx.merge(graphdef, params, rng, frozen, copy=True)
            hidden, _ = model.hidden_states(ids, attention_mask=attention_mask)
            total, count = response_nll(model.logits, hidden, ids, loss_mask, num_targets)
            return total / jnp.maximum(count, 1.0), (count, nnx.state(model, nnx.RngState))

        (loss, (count, new_rng)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rng, frozen)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, new_rng, opt_state, {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(train_step, donate_argnums=(0, 1, 2), static_argnames=("num_targets",))


def _trainable_filter(cfg: SFTConfig):
    return LoRAParam if cfg.finetune == "lora" else nnx.Param


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def _data_to_keys(tree, like):
    return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l))
                        if jnp.issubdtype(l.dtype, jax.dtypes.prng_key) else x, tree, like)


class SFTTrainer:
    """Owns the model split, the optimizer, the data and the loop. `run()` trains (or resumes) and returns metrics."""

    def __init__(self, cfg: SFTConfig, model=None, tokenizer=None):
        self.cfg = cfg
        distributed.initialize(cfg.distributed)
        self.mesh = shd.make_mesh()
        shd.check_batch(cfg.batch_size, self.mesh, "batch_size")
        self.batch_sharding = shd.batch_sharding(self.mesh)
        if model is None:
            model, tokenizer = load_base_policy(cfg.base, dtype=parse_dtype(cfg.compute_dtype, "compute_dtype"),
                                                param_dtype=parse_dtype(cfg.param_dtype, "param_dtype"))
        use_template(tokenizer, cfg.template, "config key 'template'")
        if cfg.finetune == "lora":
            add_lora(model, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     seed=cfg.seed)
        self.model, self.tokenizer = model, tokenizer

        records = load_posi_records(cfg.data, cache_dir=cfg.cache_dir)
        train_records, val_records = split_records(records, cfg.val_size, cfg.split_seed)
        self.train_examples, dropped = encode_examples(tokenizer, train_records, cfg.cutoff_len)
        self.val_examples, val_dropped = encode_examples(tokenizer, val_records, cfg.cutoff_len)
        self.dropped = dropped + val_dropped
        self.micro_per_epoch = (-(-len(self.train_examples) // cfg.batch_size) // cfg.grad_accum) * cfg.grad_accum
        if self.micro_per_epoch == 0:
            raise PosiError(f"{len(self.train_examples)} training examples make less than one optimizer step "
                            f"(batch_size {cfg.batch_size} × grad_accum {cfg.grad_accum})")
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        self.tx, self.schedule = make_optimizer(cfg, self.total_steps)

        model.eval()  # dropout off (the graphdef holds the flag)
        self.eval_graphdef = nnx.split(model, _trainable_filter(cfg), nnx.RngState, ...)[0]
        model.train()
        self.graphdef, trainable, rng, frozen = nnx.split(model, _trainable_filter(cfg), nnx.RngState, ...)
        self.trainable, self.rng, self.frozen = (shd.put(t, shd.param_shardings(t, self.mesh))
                                                 for t in (trainable, rng, frozen))
        opt_state = self.tx.init(trainable)
        self.opt_state = shd.put(opt_state, shd.param_shardings(opt_state, self.mesh))
        self._train_step = make_train_step(self.graphdef, self.tx)
        self._eval_step = jax.jit(self._eval_step_impl, static_argnames=("num_targets",))
        self._epoch_cache: tuple[int, list[Batch]] | None = None

    def _eval_step_impl(self, trainable, rng, frozen, ids, attention_mask, loss_mask, num_targets):
        model = nnx.merge(self.eval_graphdef, trainable, rng, frozen, copy=True)
        hidden, _ = model.hidden_states(ids, attention_mask=attention_mask)
        return response_nll(model.logits, hidden, ids, loss_mask, num_targets)

    # ---- data ----------------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[Batch]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = bucketed_batches(self.train_examples, self.cfg.batch_size, pad_id=self.tokenizer.pad_id,
                                       seed=self.cfg.seed, epoch=epoch, pad_multiple=self.cfg.pad_multiple)
            self._epoch_cache = (epoch, batches[: self.micro_per_epoch])
        return self._epoch_cache[1]

    def val_batches(self) -> list[Batch]:
        return bucketed_batches(self.val_examples, self.cfg.batch_size, pad_id=self.tokenizer.pad_id, seed=0,
                                epoch=0, pad_multiple=self.cfg.pad_multiple, shuffle=False)

    def _device_batch(self, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(ids, attention_mask, loss_mask) split by rows over the mesh; each process feeds its own rows. Every
        process still holds the whole host batch: `num_loss_targets` (a static shape) must agree across them."""
        return shd.put_batch((batch.ids, batch.attention_mask, batch.loss_mask), self.batch_sharding)

    # ---- public --------------------------------------------------------------------------------------------------
    def validation_loss(self, trainable=None) -> float:
        """Token-mean response NLL over the validation split (dropout off); `trainable` defaults to the current."""
        if not self.val_examples:
            return float("nan")
        trainable = self.trainable if trainable is None else trainable
        total = count = 0.0
        for b in self.val_batches():
            s, n = self._eval_step(trainable, self.rng, self.frozen, *self._device_batch(b),
                                   num_targets=num_loss_targets(b.loss_mask))
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    def step(self, batch: Batch) -> dict:
        """One micro-batch through the jitted step (an optimizer update every `grad_accum` calls); its metrics."""
        self.trainable, self.rng, self.opt_state, m = self._train_step(
            self.trainable, self.rng, self.opt_state, self.frozen, *self._device_batch(batch),
            num_targets=num_loss_targets(batch.loss_mask))
        return m

    def batch_loss(self, batch: Batch, trainable=None) -> float:
        trainable = self.trainable if trainable is None else trainable
        s, n = self._eval_step(trainable, self.rng, self.frozen, *self._device_batch(batch),
                               num_targets=num_loss_targets(batch.loss_mask))
        return float(s) / max(float(n), 1.0)

    def merged_model(self):
        """The live model object with the current trainable values written back (adapters still attached)."""
        nnx.update(self.model, self.trainable, self.rng)
        return self.model

    def checkpoint_items(self) -> dict:
        return {"params": self.trainable, "opt_state": self.opt_state, "rng": _keys_to_data(self.rng)}

    def save(self, step: int, micro: int) -> None:
        checkpointing.save(self.cfg.out_dir, step, self.checkpoint_items(),
                         extra={"step": step, "micro_step": micro, "config": to_dict(self.cfg)},
                         keep=self.cfg.keep_checkpoints)

    def restore(self, step: int | None = None) -> int:
        live = self.checkpoint_items()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), live)
        items, extra = checkpointing.restore(self.cfg.out_dir, step, abstract)
        self.trainable, self.opt_state = items["params"], items["opt_state"]
        self.rng = _data_to_keys(items["rng"], self.rng)
        return int(extra["micro_step"])

    def _check_run_dir(self, resume: bool) -> None:
        out = Path(self.cfg.out_dir)
        saved_path = out / SFT_RUN_CONFIG
        mine = to_dict(self.cfg)
        if resume:
            if not saved_path.is_file():
                raise PosiError(f"{out}: nothing to resume (no {SFT_RUN_CONFIG})")
            saved = read_json(saved_path, "SFT run config")
            saved.setdefault("template", "auto")  # runs from before the setting used the automatic choice
            changed = changed_keys(saved, self.cfg, _RESUME_MAY_CHANGE)
            if changed:
                raise PosiError(f"{out}: cannot resume with a different config: {', '.join(changed)} changed")
        elif checkpointing.latest_step(out) is not None:
            raise PosiError(f"{out} already holds checkpoints: pass --resume, or choose another out_dir")
        out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main_process():
            saved_path.write_text(json.dumps(mine, indent=2) + "\n")

    def run(self, resume: bool = False, stop_after_step: int | None = None) -> dict:
        """Train to `total_steps` (or stop after optimizer step `stop_after_step`, for tests of interruption)."""
        cfg = self.cfg
        self._check_run_dir(resume)
        start_micro = 0
        if resume and checkpointing.latest_step(cfg.out_dir) is not None:
            start_micro = self.restore()
        main = distributed.is_main_process()
        metrics = MetricsWriter(cfg.out_dir, "step", resume_step=start_micro // cfg.grad_accum if resume else None,
                                enabled=main)
        log = metrics.write

        summary: dict = {"train_examples": len(self.train_examples), "val_examples": len(self.val_examples),
                         "dropped_over_cutoff": self.dropped, "total_steps": self.total_steps}
        step = start_micro // cfg.grad_accum
        if step == 0 and self.val_examples:
            summary["val_loss_start"] = self.validation_loss()
            log({"step": 0, "val_loss": summary["val_loss_start"]})
        bar = None
        if cfg.progress and main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True)
        total_micro = self.total_steps * cfg.grad_accum
        acc = {"loss": 0.0, "tokens": 0.0, "grad_norm": 0.0}
        t0 = time.perf_counter()
        last_saved = step if start_micro else -1
        for micro in range(start_micro, total_micro):
            epoch, index = divmod(micro, self.micro_per_epoch)
            batch = self.epoch_batches(epoch)[index]
            m = self.step(batch)
            for k in acc:
                acc[k] += float(m[k])
            if not (math.isfinite(acc["loss"]) and math.isfinite(acc["grad_norm"])):
                metrics.close()
                if bar is not None:
                    bar.close()
                kept = (f"the last good checkpoint, step {last_saved}, is kept in {Path(cfg.out_dir) / 'checkpoints'}"
                        if last_saved >= 0 else "no checkpoint was saved")
                raise PosiError(f"step {micro // cfg.grad_accum + 1}: the training loss or gradient became non-finite "
                                f"(loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}); stopped without "
                                f"saving it; {kept}. Lower learning_rate or check the data")
            if (micro + 1) % cfg.grad_accum:
                continue
            step = (micro + 1) // cfg.grad_accum
            elapsed = time.perf_counter() - t0
            row = {"step": step, "epoch": round((micro + 1) / self.micro_per_epoch, 4),
                   "loss": acc["loss"] / cfg.grad_accum, "lr": float(self.schedule(step - 1)),
                   "grad_norm": acc["grad_norm"] / cfg.grad_accum, "tokens": int(acc["tokens"]),
                   "tokens_per_s": acc["tokens"] / max(elapsed, 1e-9), "step_s": elapsed}
            summary["train_loss"] = row["loss"]
            acc = {k: 0.0 for k in acc}
            if cfg.eval_every and step % cfg.eval_every == 0 and step != self.total_steps and self.val_examples:
                row["val_loss"] = self.validation_loss()
            log(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if step % cfg.save_every == 0:
                self.save(step, micro + 1)
                last_saved = step
            t0 = time.perf_counter()
            if stop_after_step is not None and step >= stop_after_step:
                break
        if bar is not None:
            bar.close()
        if step != last_saved:
            self.save(step, step * cfg.grad_accum)
        summary["step"] = step
        if step == self.total_steps:
            if self.val_examples:
                summary["val_loss"] = self.validation_loss()
                log({"step": step, "val_loss": summary["val_loss"]})
            if cfg.finetune == "lora" and main:
                self.export_adapter(Path(cfg.out_dir) / "adapter", {"step": step})
        metrics.close()
        return summary

    def export_adapter(self, folder, provenance: dict | None = None) -> Path:
        cfg = self.cfg
        base = None if cfg.base is None else str(Path(cfg.base).expanduser().absolute())
        return save_adapter(self.merged_model(), folder, targets=cfg.lora_targets, rank=cfg.lora_rank,
                            alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, base=base,
                            extra={"template": template_of(self.tokenizer), "sft_config": to_dict(cfg),
                                   **(provenance or {})})


def load_run_config(run_dir) -> SFTConfig:
    """The SFTConfig a run was trained with (run_dir/sft_config.json)."""
    return read_json_config(SFTConfig, Path(run_dir) / SFT_RUN_CONFIG, "SFT run config")


def load_run_model(run_dir, step: int | None = None, *, dtype=jnp.float32):
    """(model with the run's trained parameters, tokenizer) from an SFT run folder's orbax checkpoint."""
    cfg = load_run_config(run_dir)
    model, tokenizer = load_base_policy(cfg.base, dtype=dtype)
    use_template(tokenizer, cfg.template, f"{run_dir}: template")
    if cfg.finetune == "lora":
        add_lora(model, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                 seed=cfg.seed)
    params = nnx.state(model, _trainable_filter(cfg))
    items, _ = checkpointing.restore(run_dir, step, {"params": jax.eval_shape(lambda: params)})
    nnx.update(model, items["params"])
    model.eval()
    return model, tokenizer

