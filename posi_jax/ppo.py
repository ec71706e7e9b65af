"""python -m posi_jax.ppo — PPO on the POSI image reward (policy = SFT rewriter, LoRA or full).

    python -m posi_jax.ppo --config configs/ppo_smollm2_tiny_sd.yaml [key=value ...] [--resume]
    python -m posi_jax.ppo export RUN_DIR --out DIR    # latest checkpoint's policy -> plain HF safetensors folder

Metrics go to OUT_DIR/metrics.jsonl (one line per iteration), checkpoints to OUT_DIR/checkpoints/<iteration>/;
`--resume` continues the run in out_dir exactly (same parameters, optimizer, KL coefficient, RNG and prompt order).
A run folder (OUT_DIR, marked by its ppo_config.json) is itself a `--checkpoint` for posi_jax.rewrite / evaluate.
"""
from __future__ import annotations

import argparse
import json
import sys

from posi_jax import cli
from posi_jax.errors import PosiError


def _export(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m posi_jax.ppo export",
                                 description="the policy of a PPO run's latest checkpoint (adapter folded in) as an HF "
                                             "safetensors folder")
    ap.add_argument("run_dir", help="a PPO run folder (out_dir: ppo_config.json + checkpoints/)")
    ap.add_argument("--out", required=True, type=cli.output_dir,
                    help="output folder (config.json, model.safetensors, tokenizer files)")
    args = ap.parse_args(argv)
    from pathlib import Path

    from posi_jax.checkpoints import export_policy
    from posi_jax.rl.config import PPO_RUN_CONFIG

    if not (Path(args.run_dir) / PPO_RUN_CONFIG).is_file():
        raise PosiError(f"{args.run_dir}: not a PPO run folder (no {PPO_RUN_CONFIG})")
    export_policy(args.run_dir, args.out)
    print(args.out)
    return 0


def _train(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m posi_jax.ppo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML file overriding PPORunConfig defaults")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (ppo.batch_size=8)")
    ap.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_intermixed_args(argv)
    from posi_jax.rl.config import load_run_config
    from posi_jax.rl.run import train

    cfg = load_run_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        return cli.run(lambda: _export(argv[1:]))
    return cli.run(lambda: _train(argv), interrupted="interrupted: --resume continues from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
