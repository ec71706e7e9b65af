"""python -m posi_jax.rewrite — rewrite T2I prompts into safe ones.

Prompts come from arguments, --file (one per line) or stdin. Errors in the input print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from posi_jax import cli
from posi_jax.errors import PosiError


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m posi_jax.rewrite", description=__doc__.splitlines()[0])
    ap.add_argument("prompts", nargs="*", help="prompts to rewrite (else --file, else stdin)")
    ap.add_argument("--file", help="a UTF-8 text file, one prompt per line")
    ap.add_argument("--checkpoint", help="a .gguf file, an HF safetensors folder, a LoRA adapter folder, an SFT run folder or a PPO run folder "
                         "(default: SmolLM2-135M-Instruct + the shipped POSI adapter)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object per prompt (original, rewritten, timing, draft acceptance)")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    ap.add_argument("--temperature", type=cli.finite_float, default=0.95)
    ap.add_argument("--top-p", type=cli.finite_float, default=0.7)
    ap.add_argument("--top-k", type=cli.number(int, "[0, inf)"), default=0, help="0: off")
    ap.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    ap.add_argument("--prompt-lookup-tokens", type=cli.number(int, "[0, inf)"), default=None, metavar="K",
                    help="speculative decoding: K draft tokens per step copied from the prompt and verified by the "
                         "model (the same output in fewer steps; 0: off; default: on)")
    ap.add_argument("--no-prompt-lookup", action="store_true", help="decode one token per step (--prompt-lookup-tokens 0)")
    ap.add_argument("--max-prompt-tokens", type=cli.positive_int, default=256,
                    help="longer prompts are truncated with a warning")
    ap.add_argument("--batch-size", type=cli.positive_int, default=8)
    ap.add_argument("--seed", type=cli.seed, default=0)
    return ap.parse_intermixed_args(argv)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PosiError(f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_prompts(args) -> list[str]:
    if args.prompts and args.file:
        raise PosiError("give prompts as arguments or with --file, not both")
    if args.prompts:
        return args.prompts
    if args.file:
        try:
            with open(args.file, "rb") as f:
                text = _decode(f.read(), args.file)
        except OSError as e:
            raise PosiError(f"cannot read {args.file}: {e.strerror}") from None
        source = args.file
    else:
        if sys.stdin.isatty():
            raise PosiError("no prompts: pass them as arguments, with --file, or on stdin")
        text = _decode(sys.stdin.buffer.read(), "stdin")
        source = "stdin"
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise PosiError(f"{source}: line {n} is empty")
    if not lines:
        raise PosiError(f"{source}: no prompts")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _rewrite(args))


def _rewrite(args) -> int:
    from posi_jax.policy.chat import check_prompts
    from posi_jax.policy.rewriter import Rewriter
    from posi_jax.policy.sampler import SamplingConfig

    if args.no_prompt_lookup and args.prompt_lookup_tokens:
        raise PosiError("give --no-prompt-lookup or --prompt-lookup-tokens, not both")
    prompts = check_prompts(read_prompts(args))
    lookup = {} if args.prompt_lookup_tokens is None else {"prompt_lookup_tokens": args.prompt_lookup_tokens}
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, greedy=args.greedy,
                              **({"prompt_lookup_tokens": 0} if args.no_prompt_lookup else lookup))
    rewriter = Rewriter.load(args.checkpoint, max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size)
    progress = None
    if args.file and len(prompts) > args.batch_size:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts), unit="prompt", file=sys.stderr)
    results = rewriter.rewrite_detailed(prompts, sampling, seed=args.seed, progress=progress)
    if progress is not None:
        progress.close()
    for r in results:
        if args.json:
            rate = r.acceptance_rate
            print(json.dumps({"original": r.original, "rewritten": r.rewritten, "new_tokens": r.new_tokens,
                              "seconds": round(r.seconds, 4), "steps": r.steps, "draft_tokens": r.draft_tokens,
                              "draft_accepted": r.draft_accepted,
                              "acceptance_rate": None if rate is None else round(rate, 4)}, ensure_ascii=False))
        else:
            print(r.rewritten)
    return 0


if __name__ == "__main__":
    sys.exit(main())
