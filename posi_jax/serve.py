"""python -m posi_jax.serve — the rewriter as an HTTP service, and a safe proxy for OpenAI-compatible image APIs.

POST /v1/rewrite rewrites prompts; POST /v1/images/generations (OpenAI's images API) rewrites the prompt, then has an
upstream images API (--upstream) or our local Stable Diffusion (--sd) draw it; GET /healthz, GET /metrics
(Prometheus) and a playground page at /. The rewriter is compiled at start-up for every batch shape it serves; the
URL is printed once the server accepts connections. SIGTERM or Ctrl-C stops it after in-flight requests finish.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

from posi_jax import cli
from posi_jax.errors import PosiError

log = logging.getLogger("posi_jax.serve")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m posi_jax.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a .gguf file, an HF folder, a LoRA adapter folder, an SFT or a PPO run "
                                         "(default: SmolLM2-135M-Instruct + the shipped POSI adapter)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=cli.number(int, "[0, 65535]"), default=8000, help="0: any free port (the printed URL names it)")
    backend = ap.add_mutually_exclusive_group()
    backend.add_argument("--upstream", metavar="URL", help="an OpenAI-compatible images API's base URL, e.g. "
                         "https://api.openai.com/v1 (its key: the caller's Authorization header, else $OPENAI_API_KEY)")
    backend.add_argument("--sd", metavar="SD_FOLDER", help="draw images with our Stable Diffusion from a diffusers "
                                                           "folder")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    ap.add_argument("--request-timeout", type=cli.number(float, "(0, inf)"), default=60.0, help="seconds per request, queueing included")
    ap.add_argument("--max-prompts", type=cli.positive_int, default=32, help="prompts per /v1/rewrite request")
    ap.add_argument("--log-level", choices=("debug", "info", "warning"), default="info",
                    help="debug also logs every prompt and its rewrite")
    batching = ap.add_argument_group("batching")
    batching.add_argument("--batch-sizes", default="1,8,32", help="compiled batch sizes, increasing; the largest is "
                                                                  "the largest batch")
    batching.add_argument("--max-wait-ms", type=cli.number(float, "[0, inf)"), default=10.0,
                          help="how long a prompt waits for others to join its batch")
    batching.add_argument("--max-queue", type=cli.positive_int, default=256, help="prompts waiting; beyond it: 503 + Retry-After")
    batching.add_argument("--max-prompt-tokens", type=cli.positive_int, default=64, help="longer prompts are refused (400)")
    batching.add_argument("--prompt-lookup-max-batch", type=cli.number(int, "[0, inf)"), default=8,
                          help="larger compiled batches decode without prompt-lookup drafts (slower there on CPU)")
    sampling = ap.add_argument_group("sampling (requests may pick any compiled variant)")
    sampling.add_argument("--greedy", action="store_true")
    sampling.add_argument("--temperature", type=cli.finite_float, default=0.95)
    sampling.add_argument("--top-p", type=cli.finite_float, default=0.7)
    sampling.add_argument("--top-k", type=cli.number(int, "[0, inf)"), default=0)
    sampling.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    sampling.add_argument("--no-prompt-lookup", action="store_true",
                          help="decode one token per step (default: prompt-lookup speculative decoding, the same "
                               "rewrites in fewer steps, in batches up to --prompt-lookup-max-batch)")
    sampling.add_argument("--sampling-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                          help="also compile these settings over the defaults, e.g. greedy=true (repeatable)")
    sampling.add_argument("--seed", type=cli.seed, default=0)
    upstream = ap.add_argument_group("--upstream")
    upstream.add_argument("--upstream-timeout", type=cli.number(float, "(0, inf)"), default=60.0, help="seconds per attempt")
    upstream.add_argument("--upstream-retries", type=cli.number(int, "[0, inf)"), default=3)
    sd = ap.add_argument_group("--sd")
    sd.add_argument("--sd-steps", type=cli.positive_int, default=50)
    sd.add_argument("--sd-guidance", type=cli.finite_float, default=7.5)
    sd.add_argument("--sd-size", action="append", default=[], metavar="WxH",
                    help="a served image size (repeatable; default: the model's own)")
    sd.add_argument("--sd-max-n", type=cli.positive_int, default=4, help="images per request")
    sd.add_argument("--sd-scheduler", default=None, help="ddim, pndm, dpmpp_2m or euler (default: the folder's)")
    sd.add_argument("--sd-dtype", choices=("float32", "bfloat16"), default="float32")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _serve(args), interrupted="stopped")


def _sampling_configs(args):
    from posi_jax.config import load_config
    from posi_jax.policy.sampler import SamplingConfig

    default = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, greedy=args.greedy,
                             **({"prompt_lookup_tokens": 0} if args.no_prompt_lookup else {}))
    base = [f"{k}={v}" for k, v in dataclasses.asdict(default).items()]
    variants = []
    for text in args.sampling_variant:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            variants.append(load_config(SamplingConfig, None, base + items))
        except PosiError as e:
            raise PosiError(f"--sampling-variant {text!r}: {e}") from None
    return [default, *variants]


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise PosiError(f"--batch-sizes {text!r}: expected comma-separated integers, e.g. 1,4,16") from None


def _require_service_libraries() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx2", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise PosiError(f"python -m posi_jax.serve needs {', '.join(missing)}: pip install -e . (or pip install "
                        f"fastapi uvicorn httpx2 prometheus-client)")


def _serve(args) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = getattr(logging, args.log_level.upper())
    logging.getLogger("posi_jax").setLevel(level)
    logging.getLogger("uvicorn").setLevel(max(level, logging.INFO))
    _require_service_libraries()

    from posi_jax.data import openai_compat
    from posi_jax.serving.app import ServiceConfig
    from posi_jax.serving.batcher import BatchingConfig
    from posi_jax.serving.server import bind, url_of

    batching = BatchingConfig(batch_sizes=_batch_sizes(args.batch_sizes), max_wait_ms=args.max_wait_ms,
                              max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                              prompt_lookup_max_batch=args.prompt_lookup_max_batch)
    service = ServiceConfig(api_key=args.api_key, request_timeout_s=args.request_timeout, max_prompts=args.max_prompts,
                            rewriter=args.checkpoint or "SmolLM2-135M-Instruct + POSI adapter (embedded default)")
    if service.max_prompts > batching.max_queue:
        raise PosiError(f"--max-prompts {service.max_prompts} exceeds --max-queue {batching.max_queue}")
    sampling = _sampling_configs(args)
    if args.sd is not None and not os.path.isdir(args.sd):
        raise PosiError(f"--sd {args.sd}: Stable Diffusion folder not found")
    upstream_key = openai_compat.api_key() if os.environ.get("OPENAI_API_KEY", "").strip() else None
    if args.upstream is not None:
        openai_compat.base_url(args.upstream)
    # SIGTERM: uvicorn drains, then re-raises it; end with status 0 (also when it arrives before serving)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sock = bind(args.host, args.port)  # before anything slow: a taken port fails at once

    from posi_jax.policy.rewriter import Rewriter
    from posi_jax.serving.app import build_app
    from posi_jax.serving.batcher import DynamicBatcher
    from posi_jax.serving.metrics import Metrics, count_compilations
    from posi_jax.serving.server import serve

    count_compilations()
    metrics = Metrics(batching.batch_sizes)
    rewriter = Rewriter.load(args.checkpoint, max_prompt_tokens=batching.max_prompt_tokens,
                             batch_size=batching.max_batch)
    batcher = DynamicBatcher(rewriter, sampling, batching, metrics, seed=args.seed)
    log.info("compiling the rewriter for %d shapes (batch sizes %s x prompt lengths %s x %d sampling settings)",
             batcher.shapes, args.batch_sizes, ",".join(map(str, batcher.lengths)), len(batcher.sampling))
    warm = batcher.warm_up(progress=log.info)
    log.info("rewriter warm: %d shapes, %d compilations, %.1f s", warm["shapes"], warm["compilations"],
             warm["seconds"])
    images = _image_backend(args, metrics, upstream_key)
    app = build_app(batcher, images, metrics, service)
    url = url_of(sock)

    def ready():
        print(f"serving on {url}", flush=True)

    serve(app, sock, drain_timeout_s=service.request_timeout_s + 5, on_ready=ready)
    log.info("stopped")
    return 0


def _image_backend(args, metrics, upstream_key):
    if args.upstream is not None:
        from posi_jax.serving.upstream import UpstreamImages

        return UpstreamImages(args.upstream, server_key=upstream_key, timeout_s=args.upstream_timeout,
                              max_retries=args.upstream_retries, metrics=metrics)
    if args.sd is not None:
        from posi_jax.config import parse_dtype
        from posi_jax.diffusion.pipeline import StableDiffusion
        from posi_jax.serving.local_images import LocalImages

        sd = StableDiffusion.from_folder(args.sd, dtype=parse_dtype(args.sd_dtype, "--sd-dtype"),
                                         scheduler=args.sd_scheduler)
        images = LocalImages(sd, source=args.sd, steps=args.sd_steps, guidance_scale=args.sd_guidance,
                             sizes=tuple(args.sd_size), max_n=args.sd_max_n, seed=args.seed)
        log.info("Stable Diffusion warm: %.1f s", images.warm_up())
        return images
    return None


def _exit_on_sigterm(signum, frame):
    log.info("SIGTERM: stopped")
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
