"""python -m posi_jax.sft — supervised fine-tuning on POSI toxic→clean pairs (LoRA or full), and LoRA merge/export.

    python -m posi_jax.sft --config configs/sft_smollm2_135m.yaml [key=value ...] [--resume]
    python -m posi_jax.sft merge CHECKPOINT --out DIR    # adapter dir / SFT run dir → plain HF safetensors folder
"""
from __future__ import annotations

import argparse
import json
import sys

from posi_jax import cli


def _train(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m posi_jax.sft", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML file overriding SFTConfig defaults")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (applied after the YAML)")
    ap.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    args = ap.parse_intermixed_args(argv)
    from posi_jax.config import load_config
    from posi_jax.training.sft import SFTConfig, SFTTrainer

    cfg = load_config(SFTConfig, args.config, args.overrides)
    summary = SFTTrainer(cfg).run(resume=args.resume)
    print(json.dumps(summary))
    return 0


def _merge(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m posi_jax.sft merge",
                                 description="fold a LoRA adapter into its base and write an HF safetensors folder")
    ap.add_argument("checkpoint", help="an adapter folder (adapter_config.json) or an SFT run folder")
    ap.add_argument("--out", required=True, type=cli.output_dir,
                    help="output folder (config.json, model.safetensors, tokenizer files)")
    args = ap.parse_args(argv)
    from posi_jax.checkpoints import export_policy

    export_policy(args.checkpoint, args.out)
    print(args.out)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "merge":
        return cli.run(lambda: _merge(argv[1:]))
    return cli.run(lambda: _train(argv), interrupted="interrupted: --resume continues from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
