"""Build toxic→clean prompt pairs (POSI format) with an OpenAI-compatible chat-completions server.

    OPENAI_API_KEY=... python -m posi_jax.build_dataset toxic.txt --out pairs.jsonl --final pairs.json

INPUT is a .txt (one prompt per line), .json (list of strings or POSI records), .jsonl or .csv (a `prompt` column).
Pairs are appended to OUT as they finish; re-running the same command resumes where it stopped. Exit codes: 0 done,
2 error (bad input, no key, server unreachable; finished pairs are kept), 3 some prompts failed after all retries
(re-run to retry them), 130 interrupted by Ctrl-C (re-run to resume).
"""
from __future__ import annotations

import argparse
import sys

from posi_jax import cli
from posi_jax.data.build_pairs import BuildOptions, build_dataset, format_summary


def parse_args(argv=None) -> argparse.Namespace:
    d = BuildOptions()
    p = argparse.ArgumentParser(prog="python -m posi_jax.build_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="toxic prompts: .txt / .json / .jsonl / .csv")
    p.add_argument("--out", required=True, type=cli.output_file, help="output JSONL of pairs (appended to; resumable)")
    p.add_argument("--rejected", default=None, type=cli.output_file, help="JSONL of rejected replies with reasons "
                                                    "(default: OUT with .rejected.jsonl)")
    p.add_argument("--final", default=None, type=cli.output_file, help="also write the POSI-format JSON array here at the end")
    p.add_argument("--model", default=d.model)
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server (default: $OPENAI_BASE_URL, "
                                                    "else api.openai.com); the key comes from $OPENAI_API_KEY")
    p.add_argument("--concurrency", type=cli.setting(BuildOptions, "concurrency"), default=d.concurrency, help="requests in flight at once")
    p.add_argument("--max-retries", type=cli.setting(BuildOptions, "max_retries"), default=d.max_retries,
                   help="retries per prompt on 429 / 5xx / timeouts / connection errors / malformed replies")
    p.add_argument("--timeout", type=cli.setting(BuildOptions, "timeout_s"), default=d.timeout_s, help="seconds per request")
    p.add_argument("--backoff-base", type=cli.setting(BuildOptions, "backoff_base_s"), default=d.backoff_base_s,
                   help="first retry wait in seconds, doubled each retry, jittered")
    p.add_argument("--backoff-max", type=cli.setting(BuildOptions, "backoff_max_s"), default=d.backoff_max_s, help="longest single wait in seconds")
    p.add_argument("--max-output-chars", type=cli.setting(BuildOptions, "max_output_chars"), default=d.max_output_chars,
                   help="longer rewrites are rejected")
    p.add_argument("--temperature", type=cli.setting(BuildOptions, "temperature"), default=d.temperature)
    p.add_argument("--max-tokens", type=cli.setting(BuildOptions, "max_tokens"), default=d.max_tokens, help="completion token budget per reply")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    # A Ctrl-C before the request loop starts has sent nothing; during it, build_dataset finishes the requests in flight
    # and reports `interrupted`.
    return cli.run(lambda: _build(args, log), interrupted="interrupted before any request was sent")


def _build(args, log) -> int:
    options = BuildOptions(
        model=args.model, base_url=args.base_url, concurrency=args.concurrency, max_retries=args.max_retries,
        timeout_s=args.timeout, backoff_base_s=args.backoff_base, backoff_max_s=args.backoff_max,
        max_output_chars=args.max_output_chars, temperature=args.temperature, max_tokens=args.max_tokens)
    summary = build_dataset(args.input, args.out, options, rejected_path=args.rejected, final_path=args.final,
                            handle_sigint=True, log=log)
    print(format_summary(summary), flush=True)
    if summary.interrupted:
        print("interrupted: finished pairs are kept; re-run the same command to resume", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    if summary.n_failed:
        print(f"warning: {summary.n_failed} prompts failed after {args.max_retries + 1} attempts each; "
              "re-run the same command to retry them", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
