"""PPO settings (frozen dataclasses read from YAML + key=value overrides) and the run config of `python -m posi_jax.ppo`.

A run folder is marked by its `ppo_config.json` (PPO_RUN_CONFIG), the whole PPORunConfig it was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from posi_jax.config import check_numbers, from_dict, load_config, read_json
from posi_jax.errors import PosiError
from posi_jax.policy.chat import check_template
from posi_jax.policy.sampler import SamplingConfig
from posi_jax.reward.posi import RewardConfig
from posi_jax.rl import ppo

PPO_RUN_CONFIG = "ppo_config.json"  # what marks a PPO run folder (written by posi_jax.rl.run.train)
# Keys (and sections) that a resumed run may change: they do not change the numbers of the iterations it redoes.
# `iterations` extends or shortens the run (with the cosine schedule, the rest of the run follows the new length).
RESUME_MAY_CHANGE = ("iterations", "save_every", "keep_checkpoints", "out_dir", "mesh", "distributed")


@dataclass(frozen=True)
class LoRASettings:
    """The adapter PPO trains. An SFT adapter on the loaded policy is first merged into the base weights (in place),
    so the frozen base *is* the SFT policy: the reference (base without the PPO adapter) is the SFT model, as the KL
    term needs, and the fresh PPO adapter (B = 0) starts the policy exactly there (KL = 0 at iteration 1).

    `dropout` is 0 by default: PPO's ratio needs the rollout and the update to score tokens identically, and dropout
    draws a different mask for the old log-probs and for each update. Upstream keeps LoRA's 0.1 active through PPO
    (the model is in train mode while TRL scores and updates; rollouts run in eval mode): `dropout: 0.1` does that.
    """

    enabled: bool = True  # false: full fine-tuning (an adapter found on the loaded policy is merged first)
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    dropout: float = 0.0  # on the adapter's input while scoring and updating (never while sampling); upstream 0.1

    BOUNDS: ClassVar[dict[str, str]] = {"rank": "[1, inf)", "alpha": "(0, inf)", "seed": "[0, inf)",
                                        "dropout": "[0, 1)"}

    def __post_init__(self):
        check_numbers(self, "lora.")


@dataclass(frozen=True)
class ValueHeadSettings:
    """The critic's scalar head: Linear(hidden, 1) on the final hidden states, with dropout on its input.

    Upstream (TRL 0.7 `AutoModelForCausalLMWithValueHead`): dropout 0.1 and torch's default Linear init (kernel and
    bias uniform in ±1/sqrt(hidden)). Ours by default: no dropout (as for LoRA: the old values and the update's would
    see different masks) and a zero head, so every initial value is 0 rather than noise of the hidden states' scale.
    """

    init: str = "zeros"  # zeros | torch_default (uniform ±1/sqrt(hidden), kernel and bias: upstream)
    dropout: float = 0.0  # upstream 0.1 (active while scoring and updating)
    seed: int = 0  # torch_default init

    BOUNDS: ClassVar[dict[str, str]] = {"dropout": "[0, 1)", "seed": "[0, inf)"}

    def __post_init__(self):
        check_numbers(self, "value_head.")
        if self.init not in ("zeros", "torch_default"):
            raise PosiError(f"value_head.init: {self.init!r} is not zeros or torch_default")


@dataclass(frozen=True)
class PPOSettings:
    """One PPO iteration: `batch_size` rollouts, then `ppo_epochs` passes over them, each split into
    batch_size / mini_batch_size optimizer steps of `mini_batch_size` rows, each step's gradient the mean over
    `gradient_accumulation_steps` micro-batches.

    TRL 0.7 as upstream runs it (batch_size 16, mini_batch_size 4, gradient_accumulation_steps 4) takes ONE optimizer
    step per epoch: its backward batch is mini_batch_size x accumulation = 16 rows, whose 4 mini-batches of 4 are
    accumulated (each loss / 4). Here that is batch_size 16, mini_batch_size 16, gradient_accumulation_steps 4.
    """

    batch_size: int = 16  # prompts (rollouts) per iteration
    mini_batch_size: int = 16  # rows per optimizer step
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step (mini_batch_size / this rows each)
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    kl_penalty: str = "k1"  # k1 | k3 | abs | mse (rl/ppo.py kl_penalty)
    adaptive_kl: bool = True
    init_kl_coef: float = 0.2
    kl_target: float = 0.02  # POSI's ppo_target
    kl_horizon: float = 10000.0
    logprob_chunk_size: int = 0  # rows of the [rows, vocab] log-softmax at a time (0: all at once)
    # Temperature of the log-probs PPO scores (rollout, reference, update). None: the sampling temperature, the
    # distribution the tokens were drawn from. Upstream (TRL 0.7) scores the raw logits, 1.0: with sampling at 0.95
    # its ratio and KL then describe a distribution other than the sampled one.
    score_temperature: float | None = None
    # Whether the EOS that ends a response is a response token (scored, KL-penalised, trained; the score sits on it).
    # Upstream: no (pad = EOS and each response is cut after its last non-pad token, so the score sits on the last
    # content token and the decision to stop is never trained); ours: yes, so PPO can learn when to stop.
    eos_in_response: bool = True
    # TRL's safety net: a micro-batch whose mean ratio exceeds this contributes no gradient (its loss is zeroed; the
    # optimizer still steps, as in TRL). inf: off.
    ratio_threshold: float = 10.0

    BOUNDS: ClassVar[dict[str, str]] = {
        "batch_size": "[1, inf)", "mini_batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)",
        "ppo_epochs": "[1, inf)", "gamma": "[0, 1]", "lam": "[0, 1]", "cliprange": "(0, inf)",
        "cliprange_value": "(0, inf)", "vf_coef": "[0, inf)", "ent_coef": "[0, inf)", "init_kl_coef": "[0, inf)",
        "kl_target": "(0, inf)", "kl_horizon": "(0, inf)", "logprob_chunk_size": "[0, inf)",
        "score_temperature": "(0, inf)", "ratio_threshold": "(0, inf]"}  # ratio_threshold inf: off

    def __post_init__(self):
        check_numbers(self, "ppo.")
        if self.kl_penalty not in ppo.KL_KINDS:
            raise PosiError(f"ppo.kl_penalty: {self.kl_penalty!r} is not one of {', '.join(ppo.KL_KINDS)}")
        if self.batch_size % self.mini_batch_size:
            raise PosiError(f"ppo.batch_size {self.batch_size} is not a multiple of mini_batch_size "
                            f"{self.mini_batch_size}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise PosiError(f"ppo.mini_batch_size {self.mini_batch_size} is not a multiple of "
                            f"gradient_accumulation_steps {self.gradient_accumulation_steps}")

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.mini_batch_size

    @property
    def micro_batch_size(self) -> int:
        return self.mini_batch_size // self.gradient_accumulation_steps


@dataclass(frozen=True)
class OptimSettings:
    """AdamW (decoupled weight decay) after clip-by-global-norm, on a warmup + cosine (or constant) schedule: upstream's
    torch.optim.AdamW(lr=1.9e-5) with torch's defaults (weight decay 0.01, betas 0.9/0.999, eps 1e-8) and
    transformers' cosine schedule stepped once per PPO iteration."""

    learning_rate: float = 1.9e-5
    schedule: str = "cosine"  # cosine (to 0 at the end of the schedule, after warmup) | constant
    # What one schedule step is: "iteration" (upstream: TRL steps the scheduler once per PPO step, so the rate is
    # constant within an iteration) or "update" (every optimizer update).
    schedule_unit: str = "iteration"
    # Length of the cosine in schedule units; 0: the run's (iterations, or all its updates). Upstream: epochs x
    # ceil(prompts / batch) = 53 for 842 prompts, while its data loader drops the last partial batch (52 iterations).
    schedule_steps: int = 0
    warmup_steps: int = 0  # in schedule units
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    BOUNDS: ClassVar[dict[str, str]] = {
        "learning_rate": "[0, inf)", "warmup_steps": "[0, inf)", "weight_decay": "[0, inf)", "b1": "[0, 1)",
        "b2": "[0, 1)", "eps": "(0, inf)", "max_grad_norm": "(0, inf)", "schedule_steps": "[0, inf)"}

    def __post_init__(self):
        check_numbers(self, "optim.")
        if self.schedule not in ("cosine", "constant"):
            raise PosiError(f"optim.schedule: {self.schedule!r} is not cosine or constant")
        if self.schedule_unit not in ("iteration", "update"):
            raise PosiError(f"optim.schedule_unit: {self.schedule_unit!r} is not iteration or update")


@dataclass(frozen=True)
class PolicySettings:
    # posi_jax.checkpoints.load_policy: null = the embedded SmolLM2-135M-Instruct with the shipped SFT adapter (the
    # base alone, with a warning, if the adapter is absent); an adapter folder; an SFT run folder; a .gguf; an HF folder.
    checkpoint: str | None = None
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"


@dataclass(frozen=True)
class RewardSettings:
    kind: str = "posi"  # posi: real SD + CLIPs from the paths below | tiny_random: in-memory random tiny models
    sd_folder: str = ""  # diffusers SD v1.4 folder
    q16_clip: str = ""  # CLIP ViT-L/14 checkpoint (Q16's image encoder)
    clip: str = ""  # CLIP ViT-B/32 checkpoint (alignment score)
    q16_prompts: str = "posi:q16_prompts.p"  # a path, or the POSI release file (posi_jax.data.posi resolver)
    weights_seed: int = 0  # tiny_random only
    dtype: str = "float32"
    config: RewardConfig = RewardConfig()  # w, cap, images_per_prompt, steps, guidance_scale, seed_policy, ...

    BOUNDS: ClassVar[dict[str, str]] = {"weights_seed": "[0, inf)"}

    def __post_init__(self):
        check_numbers(self, "reward.")
        if self.kind not in ("posi", "tiny_random"):
            raise PosiError(f"reward.kind {self.kind!r}: choose posi or tiny_random")


@dataclass(frozen=True)
class MeshSettings:
    data: int = -1  # -1: all devices not used by fsdp
    fsdp: int = 1

    BOUNDS: ClassVar[dict[str, str]] = {"data": "[-1, inf)", "fsdp": "[1, inf)"}

    def __post_init__(self):
        check_numbers(self, "mesh.")
        if self.data == 0:
            raise PosiError("mesh.data must be ≥ 1, or -1 (all the devices fsdp leaves), got 0")


@dataclass(frozen=True)
class PPORunConfig:
    policy: PolicySettings = PolicySettings()
    lora: LoRASettings = LoRASettings()
    # The critic: false (ours) a separate trunk initialised from the SFT policy (its own adapter copy with LoRA), so
    # value-loss gradients never move the policy; true (upstream, TRL's AutoModelForCausalLMWithValueHead) the head
    # on the policy's own hidden states, sharing backbone and adapter.
    shared_value_backbone: bool = False
    value_head: ValueHeadSettings = ValueHeadSettings()
    # Prompt format (posi_jax.policy.chat): auto keeps what the policy checkpoint recorded (else its chat template,
    # else LLaMA-Factory's `default` template) | chat | default.
    template: str = "auto"
    sampling: SamplingConfig = SamplingConfig()
    ppo: PPOSettings = PPOSettings()
    optim: OptimSettings = OptimSettings()
    reward: RewardSettings = RewardSettings()
    mesh: MeshSettings = MeshSettings()
    prompts: str = "posi:ppo_prompts.json"  # a POSI JSON path, or the release file (posi_jax.data.posi resolver)
    max_prompts: int = 0  # use only the first N prompts (0: all)
    max_prompt_tokens: int = 256  # longer user prompts are truncated (with a warning)
    iterations: int = 100
    seed: int = 0
    out_dir: str = "runs/ppo"
    save_every: int = 10
    keep_checkpoints: int = 3
    distributed: bool = False  # join a multi-host run first (training/distributed.py; also when JAX_NUM_PROCESSES is set)

    BOUNDS: ClassVar[dict[str, str]] = {
        "max_prompts": "[0, inf)", "max_prompt_tokens": "[1, inf)", "iterations": "[1, inf)", "seed": "[0, inf)",
        "save_every": "[1, inf)", "keep_checkpoints": "[1, inf)"}

    def __post_init__(self):
        check_numbers(self, "")
        check_template(self.template, "template")

def load_run_config(path=None, overrides=None) -> PPORunConfig:
    """Defaults <- YAML file <- key=value overrides."""
    return load_config(PPORunConfig, path, overrides)


# Settings added after runs were written, whose defaults differ from what those runs did: a saved config without them
# reads as the behaviour it was trained with.
_BEFORE_THE_SETTING = {"optim": {"schedule_unit": "update"}, "ppo": {"ratio_threshold": float("inf")}}


def read_run_config(run_dir) -> PPORunConfig:
    """The PPORunConfig a run was trained with (run_dir/ppo_config.json, written by `posi_jax.rl.run.train`)."""
    path = Path(run_dir) / PPO_RUN_CONFIG
    data = read_json(path, "PPO run config")
    for section, defaults in _BEFORE_THE_SETTING.items():
        if isinstance(data.get(section), dict):
            for key, value in defaults.items():
                data[section].setdefault(key, value)
    try:
        return from_dict(PPORunConfig, data)
    except PosiError as e:
        raise PosiError(f"{path}: {e}") from None
