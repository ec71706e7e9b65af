"""python -m posi_jax.generate — text to image with a local Stable Diffusion folder (diffusers layout).

Writes one PNG per image (OUT/p{prompt:02d}_{image:02d}.png) and OUT/grid.png (a row per prompt), printing each path.
`--sld PRESET` adds Safe Latent Diffusion guidance; `--safety-checker` runs the folder's safety_checker/ on every image
(on device, after the VAE) and writes OUT/safety_checker.json (per image: flagged or not, and its scores);
`--black-out-flagged` also replaces flagged images by black ones, as diffusers' pipeline does.
Bad input prints one `error: ...` line and exits 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from posi_jax import cli
from posi_jax.errors import PosiError


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m posi_jax.generate", description=__doc__.splitlines()[0])
    ap.add_argument("prompts", nargs="+", help="one or more prompts")
    ap.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder (unet/ vae/ text_encoder/ "
                                                   "tokenizer/ scheduler/)")
    ap.add_argument("--out", required=True, type=cli.output_dir, help="output folder (created if missing)")
    ap.add_argument("--steps", type=cli.positive_int, default=50)
    ap.add_argument("--guidance", type=cli.finite_float, default=7.5, help="classifier-free guidance scale (<= 1: none)")
    ap.add_argument("--seed", type=cli.seed, default=0)
    ap.add_argument("--n", type=cli.positive_int, default=1, help="images per prompt")
    ap.add_argument("--scheduler", default=None, help="ddim, pndm, dpmpp_2m or euler (default: the folder's own)")
    ap.add_argument("--negative", default=None, help="negative prompt, used for every prompt (default: empty)")
    ap.add_argument("--height", type=cli.positive_int, default=None,
                    help="image height, multiple of 8 (default: the model's)")
    ap.add_argument("--width", type=cli.positive_int, default=None, help="image width, multiple of 8 (default: the model's)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--batch-size", type=cli.positive_int, default=None, help="images per jitted call (default: all)")
    ap.add_argument("--sld", default=None, metavar="PRESET",
                    help="Safe Latent Diffusion guidance: weak, medium, strong or max (default: none)")
    ap.add_argument("--safety-checker", action="store_true",
                    help="flag images with the model folder's safety_checker/ (writes OUT/safety_checker.json)")
    ap.add_argument("--black-out-flagged", action="store_true",
                    help="replace images the safety checker flags by black ones (implies --safety-checker)")
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _generate(args))


def _generate(args) -> int:
    if not os.path.isdir(args.model):
        raise PosiError(f"{args.model}: model folder not found")
    import numpy as np

    from posi_jax.config import parse_dtype
    from posi_jax.diffusion.pipeline import StableDiffusion, image_grid, save_png, to_uint8
    from posi_jax.diffusion.sld import sld_config

    sld = sld_config(args.sld)
    dtype = parse_dtype(args.dtype, "--dtype")
    checker = None
    if args.safety_checker or args.black_out_flagged:
        from posi_jax.weights.sd import has_safety_checker, load_sd_safety_checker

        if not has_safety_checker(args.model):
            raise PosiError(f"{args.model}: no safety_checker/ folder (needed by --safety-checker)")
        checker = load_sd_safety_checker(args.model, dtype)
    sd = StableDiffusion.from_folder(args.model, dtype=dtype, scheduler=args.scheduler)
    try:  # only once the model has loaded: a failed run leaves no empty folder behind
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise PosiError(f"cannot create output folder {args.out}: {e.strerror}") from None
    images = sd.generate(args.prompts, args.negative, seed=args.seed, num_images_per_prompt=args.n,
                         steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
                         batch_size=args.batch_size, sld=sld)
    names = [f"p{k // args.n:02d}_{k % args.n:02d}.png" for k in range(images.shape[0])]
    report = None
    if checker is not None:
        from posi_jax.reward.safety_checker import black_out, check_images_jit

        checks = check_images_jit(checker, images)  # on device, on the decoded images
        if args.black_out_flagged:
            images = black_out(images, checks["flagged"])
        report = _write_checker_report(args, names, {k: np.asarray(v) for k, v in checks.items()})
    images = to_uint8(np.asarray(images))
    paths = []
    for name, image in zip(names, images):
        path = os.path.join(args.out, name)
        save_png(image, path)
        paths.append(path)
    grid = os.path.join(args.out, "grid.png")
    save_png(image_grid(images, cols=args.n), grid)
    for path in paths + [grid] + ([report] if report else []):
        print(path)
    return 0


def _write_checker_report(args, names: list[str], checks: dict) -> str:
    import json

    flagged = [name for name, f in zip(names, checks["flagged"]) if f]
    records = [{"image": name, "prompt": args.prompts[k // args.n], "flagged": bool(checks["flagged"][k]),
                "blacked_out": bool(checks["flagged"][k]) and args.black_out_flagged,
                "special_care": bool(checks["special_care"][k]),
                "concept_scores": [round(float(x), 3) for x in checks["concept_scores"][k]],
                "special_scores": [round(float(x), 3) for x in checks["special_scores"][k]]}
               for k, name in enumerate(names)]
    path = os.path.join(args.out, "safety_checker.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    action = " (blacked out)" if args.black_out_flagged and flagged else ""
    print(f"safety checker: {len(flagged)} of {len(names)} images flagged{action}"
          + (f": {', '.join(flagged)}" if flagged else ""), file=sys.stderr)
    return path


if __name__ == "__main__":
    sys.exit(main())
