"""PPO settings (frozen dataclasses read from YAML + key=value overrides) and the run config of `python -m posi_jax.ppo`.

A run folder is marked by its `ppo_config.json` (PPO_RUN_CONFIG), the whole PPORunConfig it was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posi_jax.config import load_config, read_json_config
from posi_jax.errors import PosiError
from posi_jax.policy.sampler import SamplingConfig
from posi_jax.reward.posi import RewardConfig
from posi_jax.rl import ppo

PPO_RUN_CONFIG = "ppo_config.json"  # what marks a PPO run folder (written by posi_jax.rl.run.train)


@dataclass(frozen=True)
class LoRASettings:
    """The adapter PPO trains. An SFT adapter on the loaded policy is first merged into the base weights (in place),
    so the frozen base *is* the SFT policy: the reference (base without the PPO adapter) is the SFT model, as the KL
    term needs, and the fresh PPO adapter (B = 0) starts the policy exactly there (KL = 0 at iteration 1).

    Adapters are built without dropout: PPO's ratio needs the rollout and the update to score tokens identically.
    """

    enabled: bool = True  # false: full fine-tuning (an adapter found on the loaded policy is merged first)
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0


@dataclass(frozen=True)
class PPOSettings:
    batch_size: int = 16  # prompts (rollouts) per iteration
    mini_batch_size: int = 4  # rows per optimizer step
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (mini_batch_size / this rows each)
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

    def __post_init__(self):
        if self.kl_penalty not in ppo.KL_KINDS:
            raise PosiError(f"ppo.kl_penalty: {self.kl_penalty!r} is not one of {', '.join(ppo.KL_KINDS)}")
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise PosiError(f"ppo.{name} must be ≥ 1, got {getattr(self, name)}")
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
    learning_rate: float = 1.9e-5
    schedule: str = "cosine"  # cosine (to 0 over the run, after warmup) | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise PosiError(f"optim.schedule: {self.schedule!r} is not cosine or constant")


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

    def __post_init__(self):
        if self.kind not in ("posi", "tiny_random"):
            raise PosiError(f"reward.kind {self.kind!r}: choose posi or tiny_random")


@dataclass(frozen=True)
class MeshSettings:
    data: int = -1  # -1: all devices not used by fsdp
    fsdp: int = 1


@dataclass(frozen=True)
class PPORunConfig:
    policy: PolicySettings = PolicySettings()
    lora: LoRASettings = LoRASettings()
    shared_value_backbone: bool = False
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
    distributed: bool = False  # jax.distributed.initialize() first (multi-host TPU VMs)


def load_run_config(path=None, overrides=None) -> PPORunConfig:
    """Defaults <- YAML file <- key=value overrides."""
    return load_config(PPORunConfig, path, overrides)


def read_run_config(run_dir) -> PPORunConfig:
    """The PPORunConfig a run was trained with (run_dir/ppo_config.json, written by `posi_jax.rl.run.train`)."""
    return read_json_config(PPORunConfig, Path(run_dir) / PPO_RUN_CONFIG, "PPO run config")
