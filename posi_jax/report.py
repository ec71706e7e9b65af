"""python -m posi_jax.report — a training run's curves (PNG) and a one-page HTML summary.

    python -m posi_jax.report RUN_DIR [--out DIR] [--compare N [--max-new-tokens 96]]

RUN_DIR is an SFT or PPO run folder (its metrics.jsonl; TensorBoard reads the event files next to it). Writes
DIR/curves.png (loss, reward and its components, KL and its coefficient, entropy, clip fraction, value loss, learning
rate, tokens/s, and every other logged scalar), DIR/index.html (key numbers, a table of every metric, the logged sample
rewrites, the config) and DIR/summary.json; DIR defaults to RUN_DIR/report. `--compare N` (SFT runs) adds a
before/after table: N held-out prompts plus fixed toxic and clean ones, rewritten greedily by the base model and by the
run. Plots need matplotlib: pip install 'posi_jax[report]'.
"""
from __future__ import annotations

import argparse
import sys

from posi_jax import cli


def _report(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m posi_jax.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="an SFT or PPO run folder (out_dir of python -m posi_jax.sft / ppo)")
    ap.add_argument("--out", default=None, type=cli.output_dir, help="output folder (default: RUN_DIR/report)")
    ap.add_argument("--compare", type=cli.number(int, "[0, inf)"), default=0, metavar="N",
                    help="SFT runs: add a greedy before/after table on N held-out prompts + fixed toxic/clean ones")
    ap.add_argument("--max-new-tokens", type=cli.positive_int, default=96, help="for --compare")
    ap.add_argument("--max-sample-rows", type=cli.number(int, "[2, inf)"), default=20,
                    help="logged steps whose sample rewrites the page shows (evenly spaced)")
    args = ap.parse_args(argv)
    from posi_jax.training.run_report import compare_rewrites, write_report

    comparison = compare_rewrites(args.run_dir, args.compare, max_new_tokens=args.max_new_tokens) \
        if args.compare else None
    report = write_report(args.run_dir, args.out, comparison=comparison, max_sample_rows=args.max_sample_rows)
    print(report.png)
    print(report.html)
    return 0


def main(argv=None) -> int:
    return cli.run(lambda: _report(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
