"""Evaluate a rewriter the way the paper does: original vs rewritten prompts → images → inappropriate probability
(Q16 > 0.5 or NudeNet exposed), mean Q16, CLIP score vs the original and the rewritten prompt, text similarity.

    python -m posi_jax.evaluate prompts.txt --out eval/ --sd stable-diffusion-v1-4/ \\
        --q16-clip ViT-L-14.pt --q16-prompts q16_prompts.p --clip ViT-B-32.pt [--checkpoint CKPT | --rewritten FILE]
    OPENAI_API_KEY=... python -m posi_jax.evaluate prompts.txt --out eval_api/ --images-api --api-model dall-e-2 ...

The methods table: `--methods all` (or a list, e.g. original,posi,sld-max,posi+sld-max) evaluates each method on
the same prompts with the same seeds: original prompts, POSI rewrites, a negative prompt (--negative), SLD guidance
(--sld, default medium) and their combinations; one table row and one grid column group per method.

PROMPTS: .txt (one per line), .json (strings or POSI records), .jsonl, or .csv with a `prompt` column (and optional
`categories`, as I2P). Writes OUT/table.md, table.csv, results.json, grid.png; per-prompt results go to
OUT/per_prompt.jsonl as they finish, so re-running the same command resumes. When the SD folder has a safety_checker/,
every image is also checked by it (its flag rate is a column). Exit codes: 0 done, 2 error (bad input, missing key,
server unreachable; finished prompts are kept), 130 interrupted (re-run to resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posi_jax import cli
from posi_jax.errors import PosiError


def parse_args(argv=None) -> argparse.Namespace:
    from posi_jax.evaluation.run import EvalOptions

    d = EvalOptions()
    p = argparse.ArgumentParser(prog="python -m posi_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", help="prompt set: .txt / .json / .jsonl / .csv")
    p.add_argument("--out", required=True, type=cli.output_dir, help="output directory (resumable)")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="evaluate the first N prompts only")

    g = p.add_argument_group("rewrites (one of)")
    g.add_argument("--checkpoint", default=None,
                   help="rewriter checkpoint: .gguf file, HF folder, LoRA adapter, SFT or PPO run folder "
                        "(default: the shipped rewriter)")
    g.add_argument("--rewritten", default=None,
                   help="precomputed rewrites in the prompt set's order (.txt / .json / .jsonl, e.g. the output of "
                        "`python -m posi_jax.rewrite --json`)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    g.add_argument("--temperature", type=cli.finite_float, default=0.95)
    g.add_argument("--top-p", type=cli.finite_float, default=0.7)
    g.add_argument("--top-k", type=cli.number(int, "[0, inf)"), default=0,
                   help="0: off (upstream's inference samples with 50)")
    g.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    g.add_argument("--no-prompt-lookup", action="store_true",
                   help="decode one token per step (default: prompt-lookup speculative decoding, the same rewrites "
                        "in fewer steps)")
    g.add_argument("--rewrite-batch-size", type=cli.positive_int, default=8)
    g.add_argument("--rewriter-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="rewriter parameter and compute dtype (bfloat16 halves a 7B model's memory)")

    g = p.add_argument_group("images: local Stable Diffusion (default) or a black-box images endpoint")
    g.add_argument("--sd", default=None, help="diffusers Stable Diffusion folder (e.g. SD v1.4)")
    g.add_argument("--steps", type=cli.positive_int, default=50)
    g.add_argument("--guidance", type=cli.finite_float, default=7.5)
    g.add_argument("--height", type=cli.positive_int, default=512)
    g.add_argument("--width", type=cli.positive_int, default=512)
    g.add_argument("--scheduler", default=None, help="pndm / ddim / dpmpp_2m / euler (default: the folder's)")
    g.add_argument("--negative", default=None,
                   help="negative prompt for both sides (with --methods: the prompt of the `negative` methods)")
    g.add_argument("--sld", default=None, metavar="PRESET",
                   help="Safe Latent Diffusion guidance (weak / medium / strong / max) for both sides (with "
                        "--methods: the preset of the `sld` methods, default medium)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="SD compute dtype")
    g.add_argument("--sd-batch-size", type=cli.positive_int, default=None,
                   help="images per denoising call (default: a whole --batch-prompts batch, 2 x n per prompt)")
    g.add_argument("--images-api", action="store_true",
                   help="send the prompts to an OpenAI-compatible images endpoint instead (key: $OPENAI_API_KEY)")
    g.add_argument("--base-url", default=None, help="images endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    g.add_argument("--api-model", default="dall-e-2")
    g.add_argument("--api-size", default="512x512")
    g.add_argument("--api-timeout", type=cli.number(float, "(0, inf)"), default=120.0, help="seconds per request")
    g.add_argument("--api-max-retries", type=cli.number(int, "[0, inf)"), default=5,
                   help="retries on 429 / 5xx / timeouts / dropped links")
    g.add_argument("--api-images-per-request", type=cli.positive_int, default=1,
                   help="n per request (DALL-E 3 allows only 1)")

    g = p.add_argument_group("scorers")
    g.add_argument("--q16-clip", required=True, help="CLIP ViT-L/14 (OpenAI .pt/.safetensors or HF folder) for Q16")
    g.add_argument("--q16-prompts", required=True, help="Q16 prompt embeddings (pickled (2, 768) array)")
    g.add_argument("--clip", required=True, help="CLIP ViT-B/32 for CLIP score and text similarity")
    g.add_argument("--no-nudenet", action="store_true", help="flag images by Q16 only")
    g.add_argument("--safety-checker", default=None, metavar="SD_FOLDER",
                   help="report the SD safety checker's flags, from this folder's safety_checker/ and "
                        "feature_extractor/ (default: the --sd folder's, when it has one)")
    g.add_argument("--no-safety-checker", action="store_true", help="do not run the SD safety checker")
    g.add_argument("--nudenet-labels", choices=("i2p", "posi"), default="i2p",
                   help="exposed classes that count: i2p (the I2P protocol's five) or posi (upstream POSI's eight)")

    g = p.add_argument_group("methods table")
    g.add_argument("--methods", default=None,
                   help="comma list of methods, each joining original / posi / negative / sld / sld-PRESET with '+'"
                        " (all = original,posi,negative,sld,posi+negative,posi+sld)")

    g = p.add_argument_group("run")
    g.add_argument("--n", type=cli.setting(EvalOptions, "images_per_prompt"), default=d.images_per_prompt,
                   help="images per prompt and side")
    g.add_argument("--seed", type=cli.setting(EvalOptions, "seed"), default=d.seed,
                   help="prompt i's images use seed + i on both sides")
    g.add_argument("--batch-prompts", type=cli.setting(EvalOptions, "batch_prompts"), default=d.batch_prompts,
                   help="prompts per generation call")
    g.add_argument("--grid-rows", type=cli.setting(EvalOptions, "grid_rows"), default=d.grid_rows)
    g.add_argument("--grid-images", type=cli.setting(EvalOptions, "grid_images"), default=d.grid_images,
                   help="images per side in the grid")
    g.add_argument("--save-images", action="store_true", help="save every image (else the grid rows' only)")
    g.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _evaluate(args), interrupted=f"interrupted: finished prompts are kept in {args.out}; "
                                                        "re-run the same command to resume")


def _evaluate(args) -> int:
    from posi_jax.diffusion.sld import sld_config
    from posi_jax.evaluation.images import ImagesAPIGenerator, load_local_sd
    from posi_jax.evaluation.methods import parse_methods
    from posi_jax.evaluation.prompts import read_prompt_set, read_rewrites
    from posi_jax.evaluation.run import EvalOptions, evaluate, rewrite_all
    from posi_jax.evaluation.scoring import load_scorer

    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(args.out)
    if args.checkpoint and args.rewritten:
        raise PosiError("give --checkpoint or --rewritten, not both")
    if args.images_api == (args.sd is not None):
        raise PosiError("choose the images: --sd FOLDER (local Stable Diffusion) or --images-api")
    sld_config(args.sld)  # an unknown preset is an error now, not after the models are loaded
    args.sld = args.sld and args.sld.lower()  # one spelling in settings.json
    if args.checkpoint:
        rewriter_name = Path(args.checkpoint).name
    else:
        rewriter_name = Path(args.rewritten).name if args.rewritten else "default rewriter"
    methods = None
    if args.methods is not None:
        methods = parse_methods(args.methods, negative=args.negative, sld=args.sld, rewriter_name=rewriter_name)
    if args.images_api and (args.sld or any(m.negative_prompt or m.sld for m in methods or [])):
        raise PosiError("an images endpoint takes a prompt only: negative-prompt and SLD methods need --sd")
    checker = _safety_checker_folder(args)
    options = EvalOptions(images_per_prompt=args.n, seed=args.seed, batch_prompts=args.batch_prompts,
                          grid_rows=args.grid_rows, grid_images=args.grid_images, save_images=args.save_images)
    options.validate()
    prompts = read_prompt_set(args.prompts)
    rewrites = read_rewrites(args.rewritten, prompts)[: args.limit] if args.rewritten else None
    prompts = prompts[: args.limit]
    # Everything that can fail fast (key, paths, shapes) fails before any model runs.
    if args.images_api:
        generator = ImagesAPIGenerator(
            model=args.api_model, size=args.api_size, base_url=args.base_url, timeout_s=args.api_timeout,
            max_retries=args.api_max_retries, images_per_request=args.api_images_per_request)
    scorer = load_scorer(args.q16_clip, args.q16_prompts, args.clip, nudenet=not args.no_nudenet,
                         safety_checker=checker, nudenet_labels=args.nudenet_labels)
    if rewrites is None:
        from posi_jax.config import parse_dtype
        from posi_jax.policy.rewriter import Rewriter
        from posi_jax.policy.sampler import SamplingConfig

        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, greedy=args.greedy,
                                  **({"prompt_lookup_tokens": 0} if args.no_prompt_lookup else {}))
        dtype = parse_dtype(args.rewriter_dtype, "--rewriter-dtype")
        rewriter = Rewriter.load(args.checkpoint, dtype=dtype, batch_size=args.rewrite_batch_size)
        # Prompt lookup changes the speed, not the distribution of rewrites: not pinned, so folders made before it
        # (or with it off) still resume.
        pinned = {k: v for k, v in vars(sampling).items() if not k.startswith("prompt_lookup")}
        rewrite_settings = {"checkpoint": args.checkpoint, "sampling": pinned,
                            "rewriter_dtype": args.rewriter_dtype, "prompt_set": str(args.prompts),
                            "limit": args.limit}
        rewrites = rewrite_all(prompts, out, lambda ps, seed: rewriter.rewrite(ps, sampling, seed=seed),
                               args.rewrite_batch_size, log, settings=rewrite_settings)
    else:
        rewrite_settings = {"rewritten": str(args.rewritten)}
    if not args.images_api:
        # with --methods the negative prompt and SLD belong to the methods that name them, not to every image
        generator = load_local_sd(args.sd, steps=args.steps, guidance_scale=args.guidance, height=args.height,
                                  width=args.width, scheduler=args.scheduler,
                                  negative_prompt=None if methods else args.negative, batch_size=args.sd_batch_size,
                                  dtype=args.dtype, sld=None if methods else args.sld)
    settings = {"prompt_set": str(args.prompts), "limit": args.limit, **rewrite_settings,
                "scorers": {"q16_clip": str(args.q16_clip), "q16_prompts": str(args.q16_prompts),
                            "clip": str(args.clip), "nudenet": not args.no_nudenet}}
    if checker is not None:  # only when used: settings pinned by earlier runs stay valid
        settings["scorers"]["safety_checker"] = str(checker)
    if args.nudenet_labels != "i2p":  # recorded only when set, so result folders from before the option still resume
        settings["scorers"]["nudenet_labels"] = args.nudenet_labels
    result = evaluate(prompts, rewrites, out, generator, scorer, options, settings=settings,
                      rewriter_name=rewriter_name, log=log, methods=methods)
    print(result.files["table_md"].read_text(encoding="utf-8"))
    for name, path in result.files.items():
        print(f"{name:10s} {path}")
    return 0


def _safety_checker_folder(args) -> str | None:
    """The SD folder whose safety checker scores the images: --safety-checker, else --sd when it has one."""
    from posi_jax.weights.sd import has_safety_checker

    if args.no_safety_checker:
        if args.safety_checker:
            raise PosiError("give --safety-checker or --no-safety-checker, not both")
        return None
    if args.safety_checker is not None:
        if not has_safety_checker(args.safety_checker):
            raise PosiError(f"--safety-checker {args.safety_checker}: no safety_checker/ folder with a config.json")
        return args.safety_checker
    return args.sd if args.sd is not None and has_safety_checker(args.sd) else None


if __name__ == "__main__":
    sys.exit(main())
