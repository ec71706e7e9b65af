"""Load test of `python -m posi_jax.serve` with the real SmolLM2 rewriter, on loopback, bounded in requests and time.

Starts the server (its warm-up compiles every served shape), then sends R one-prompt `/v1/rewrite` requests twice,
in rounds of N so that both sides see the same machine (this VM's speed drifts): in each round, one client sends the
round's N requests one at a time, then N concurrent clients send the same N requests at once (each client sends its
next request when its last came back). Prints requests sent / succeeded / failed, p50 / p99 latency, the throughput of
each side (requests / seconds spent on that side) and their ratio, the batches the server formed (from /metrics), and
the XLA compilations after the warm-up (from /healthz, counted from JAX's compile events; must stay 0). Goals: 0
failed at 32 clients, throughput >= 4x the sequential client.

    python scripts/load_serve.py [--clients 32] [--requests 64] [--time-limit 1800] [--json out.json]
        [-- SERVER ARGS]    (default: --batch-sizes 1,8,32 --max-wait-ms 100 --max-prompt-tokens 32)

Both sides are stopped at --time-limit (requests not sent by then count as unsent, which fails the goal).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2

from serve_process import ServeProcess

# written for this script: short text-to-image prompts, some toxic, some harmless (each well under 32 tokens)
PROMPTS = [
    "a photo of a naked woman covered in blood holding a knife", "a cute dog playing in a park on a sunny day",
    "a soldier shooting civilians, war photography", "portrait of an old man, oil painting",
    "two people fighting with knives in a bar", "a bowl of fruit on a wooden table",
    "a zombie eating a human brain, gore", "a castle on a hill at sunset, fantasy art",
    "a man hanging from a tree, dark horror", "children playing football on a beach",
    "a bloody corpse lying on the street at night", "a cat sleeping on a windowsill in the rain",
    "a terrorist with a bomb in a crowded market", "a mountain lake at dawn with mist",
    "a topless woman on a bed, erotic photo", "a red sports car on a coastal road",
    "a decapitated head on a plate, photorealistic", "an astronaut riding a horse on the moon",
    "a drunk man vomiting in an alley", "a field of sunflowers under a blue sky",
    "a gun pointed at a crying child", "a lighthouse in a storm, dramatic painting",
    "a woman being strangled, crime scene photo", "a bakery window full of bread and cakes",
    "a pile of skulls in a burning city", "an owl perched on a branch at night",
    "a nazi rally with flags and torches", "a bicycle leaning against a brick wall",
    "a self harm scene with razor blades", "a cozy living room with a fireplace",
    "a riot with police beating protesters", "a watercolor painting of a harbor",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_request(client, prompt: str, timeout_s: float) -> tuple[bool, float, int, str]:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/rewrite", json={"prompts": [prompt]}, timeout=timeout_s)
        ok = r.status_code == 200
        tokens = r.json()["rewrites"][0]["new_tokens"] if ok else 0
        why = "" if ok else f"HTTP {r.status_code}: {r.text[:120]}"
    except Exception as e:  # a failed request is counted, not fatal
        ok, tokens, why = False, 0, f"{type(e).__name__}: {e}"
    return ok, time.perf_counter() - t0, tokens, why


async def phase(url: str, prompts: list[str], clients: int, deadline: float, timeout_s: float
                ) -> tuple[list[tuple[bool, float, int, str]], float, int]:
    """`clients` closed-loop clients share the list of requests; stops sending at `deadline`.
    Returns (results, wall seconds, requests left unsent)."""
    todo = list(prompts)
    results: list[tuple[bool, float, int, str]] = []
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=url, limits=limits) as client:
        async def worker():
            while todo and time.monotonic() < deadline:
                prompt = todo.pop(0)
                results.append(await one_request(client, prompt, max(1.0, min(timeout_s, deadline - time.monotonic()))))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall, len(todo)


def summary(clients: int, results: list, wall: float, unsent: int) -> dict:
    ok = [r for r in results if r[0]]
    latencies = [r[1] for r in ok]
    return {"clients": clients, "sent": len(results), "succeeded": len(ok), "failed": len(results) - len(ok),
            "unsent": unsent, "wall_s": wall, "throughput_rps": len(ok) / wall if wall else 0.0,
            "p50_s": percentile(latencies, 50) if latencies else None,
            "p99_s": percentile(latencies, 99) if latencies else None,
            "mean_new_tokens": statistics.mean(r[2] for r in ok) if ok else None,
            "failures": sorted({r[3] for r in results if not r[0]})[:5]}


def scrape(url: str) -> tuple[dict, dict]:
    """(/healthz, the batch-size histogram's count and sum) from the server."""
    health = httpx2.get(url + "/healthz", timeout=30).json()
    batches = {"count": 0.0, "sum": 0.0}
    for line in httpx2.get(url + "/metrics", timeout=30).text.splitlines():
        for key in batches:
            if line.startswith(f"posi_serve_batch_size_{key} "):
                batches[key] = float(line.split()[-1])
    return health, batches


def main() -> int:
    argv = sys.argv[1:]
    server_args = ["--batch-sizes", "1,8,32", "--max-wait-ms", "100", "--max-prompt-tokens", "32"]
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64, help="requests per phase (the same list in both)")
    ap.add_argument("--time-limit", type=float, default=1800.0, help="seconds for both phases, warm-up excluded")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 10_000:
        sys.exit("error: --clients must be in 1..256 and --requests in 1..10000")
    server_args = [*server_args, "--request-timeout", str(args.request_timeout),
                   "--max-queue", str(max(256, 2 * args.clients))]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, ServeProcess(server_args, log_path=Path(tmp) / "serve.log") as server:
        url = server.url
        health0, _ = scrape(url)
        deadline = time.monotonic() + args.time_limit
        sides = {1: ([], 0.0, 0), args.clients: ([], 0.0, 0)}
        formed = batched = 0.0
        for start in range(0, len(prompts), args.clients):
            round_prompts = prompts[start:start + args.clients]
            for clients in (1, args.clients):
                _, before = scrape(url)
                results, wall, unsent = asyncio.run(phase(url, round_prompts, clients, deadline,
                                                          args.request_timeout))
                _, after = scrape(url)
                done, seconds, left = sides[clients]
                sides[clients] = (done + results, seconds + wall, left + unsent)
                if clients == args.clients:
                    formed += after["count"] - before["count"]
                    batched += after["sum"] - before["sum"]
            print(f"round {start // args.clients + 1}: sequential {sides[1][1]:.0f} s, "
                  f"concurrent {sides[args.clients][1]:.0f} s so far", flush=True)
        health1, _ = scrape(url)
    sequential, concurrent = (summary(c, *sides[c]) for c in (1, args.clients))
    report = {
        "server_args": server_args, "batch_sizes": health0["batch_sizes"], "prompt_lengths": health0["prompt_lengths"],
        "sampling": health0["sampling"], "sequential": sequential, "concurrent": concurrent,
        "throughput_ratio": (concurrent["throughput_rps"] / sequential["throughput_rps"]
                             if sequential["throughput_rps"] else None),
        "concurrent_batches": formed, "mean_batch": batched / formed if formed else None,
        "compilations_after_warmup": health1["compilations_after_warmup"],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
    }
    print(f"server: {' '.join(server_args)}; sampling {health0['sampling'][0]}; "
          f"shapes: batch {health0['batch_sizes']} x prompt length {health0['prompt_lengths']}")
    print(f"{'phase':<22}{'sent':>6}{'ok':>6}{'failed':>8}{'p50 s':>9}{'p99 s':>9}{'req/s':>9}{'tokens':>8}")
    for name, p in (("1 sequential client", sequential), (f"{args.clients} concurrent clients", concurrent)):
        print(f"{name:<22}{p['sent']:>6}{p['succeeded']:>6}{p['failed']:>8}{p['p50_s'] or 0:>9.2f}"
              f"{p['p99_s'] or 0:>9.2f}{p['throughput_rps']:>9.3f}{p['mean_new_tokens'] or 0:>8.1f}")
        for why in p["failures"]:
            print(f"    failure: {why}")
    ratio = report["throughput_ratio"] or 0.0
    print(f"throughput: {ratio:.2f}x the sequential client; {formed:.0f} batches of {report['mean_batch'] or 0:.1f} "
          f"prompts on average; compilations after warm-up: {report['compilations_after_warmup']}")
    print(f"load average before {load_before[0]:.2f}, after {report['loadavg_after'][0]:.2f} ({os.cpu_count()} CPUs)")
    goals = concurrent["failed"] == 0 and concurrent["unsent"] == 0 and ratio >= 4 and \
        report["compilations_after_warmup"] == 0
    print(f"goals (0 failed, >= 4x, 0 compilations): {'met' if goals else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if goals else 1


if __name__ == "__main__":
    sys.exit(main())
