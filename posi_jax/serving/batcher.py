"""Dynamic batching for the rewriter: prompts from concurrent requests are gathered (up to the largest batch size, or
until the oldest has waited `max_wait_ms`) into one `Rewriter.rewrite_detailed` call whose shape is one of a few
compiled at start-up, so no load ever triggers a compilation.

The compiled shapes are (batch size, prompt layout, sampling settings): batch sizes from `batch_sizes` (a batch is
padded with copies of its first prompt up to the next one), prompt layouts the rewriter's (shared prefix, padded
length) that a prompt of at most `max_prompt_tokens` tokens can reach (a batch is padded to its longest prompt), and the sampling
settings the server was started with. `warm_up` runs every one of them once; a prompt that would need another shape
is refused before it is queued. Batches run one at a time on a single device thread; the event loop only queues.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from posi_jax.errors import PosiError
from posi_jax.policy.chat import check_prompts
from posi_jax.policy.rewriter import Rewrite, Rewriter
from posi_jax.policy.sampler import SamplingConfig
from posi_jax.serving.metrics import Metrics, compilations

log = logging.getLogger("posi_jax.serve")

_PROBE_SENTENCE = "a photo of a cat sitting on a wooden chair in a sunny garden with flowers and trees. "
_CHARS_PER_TOKEN_LIMIT = 64  # longer prompts are refused without tokenizing them (no BPE token is this long)


@dataclass(frozen=True)
class BatchingConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # compiled batch shapes; the last is the largest batch
    max_wait_ms: float = 10.0  # how long the oldest queued prompt waits for others to join its batch
    max_queue: int = 256  # prompts waiting for a batch; a request that would exceed it gets 503 + Retry-After
    max_prompt_tokens: int = 64  # longer prompts are refused (400), which bounds the compiled prompt lengths
    # compiled batches larger than this decode one token per step: a prompt-lookup window of k + 1 positions per row
    # made batch 32 slower on a 2-core CPU (short rewrites: 6.94 s vs 4.77 s greedy, 9.31 s vs 5.69 s sampled)
    prompt_lookup_max_batch: int = 8

    def __post_init__(self):
        sizes = self.batch_sizes
        if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes) or list(sizes) != sorted(set(sizes)):
            raise PosiError(f"batch sizes must be increasing integers >= 1, got {','.join(map(str, sizes))}")
        if not self.max_wait_ms >= 0:
            raise PosiError(f"max wait must be >= 0 ms, got {self.max_wait_ms}")
        if self.max_queue < sizes[-1]:
            raise PosiError(f"the queue ({self.max_queue} prompts) must hold at least one full batch ({sizes[-1]})")
        if self.max_prompt_tokens < 1:
            raise PosiError(f"max prompt tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.prompt_lookup_max_batch < 0:
            raise PosiError(f"prompt lookup max batch must be >= 0, got {self.prompt_lookup_max_batch}")

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def bucket(self, n: int) -> int:
        """The compiled batch size a batch of n prompts is padded to."""
        return next(b for b in self.batch_sizes if b >= n)

    def decoding(self, sampling: SamplingConfig, size: int) -> SamplingConfig:
        """The settings a compiled batch of `size` rows decodes with: the served ones, without prompt-lookup drafts
        above `prompt_lookup_max_batch` (the same rewrites or the same distribution either way)."""
        if size > self.prompt_lookup_max_batch and sampling.prompt_lookup_tokens:
            return dataclasses.replace(sampling, prompt_lookup_tokens=0)
        return sampling


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the rewrite queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # identity: two requests may queue the same prompt
class _Item:
    prompt: str
    sampling: SamplingConfig
    future: asyncio.Future
    enqueued: float
    cancelled: bool = False


def describe_sampling(cfg: SamplingConfig) -> str:
    if cfg.greedy:
        return f"greedy, max_new_tokens={cfg.max_new_tokens}"
    return f"temperature={cfg.temperature}, top_p={cfg.top_p}, top_k={cfg.top_k}, max_new_tokens={cfg.max_new_tokens}"


class DynamicBatcher:
    def __init__(self, rewriter: Rewriter, sampling: Sequence[SamplingConfig], config: BatchingConfig,
                 metrics: Metrics | None = None, seed: int = 0):
        if rewriter.batch_size < config.max_batch:
            raise PosiError(f"the rewriter's batch size {rewriter.batch_size} is below the largest served batch "
                            f"{config.max_batch}")
        if rewriter.max_prompt_tokens < config.max_prompt_tokens:
            raise PosiError(f"the rewriter truncates prompts at {rewriter.max_prompt_tokens} tokens, below the "
                            f"served {config.max_prompt_tokens}")
        self.rewriter, self.config, self.metrics = rewriter, config, metrics
        self.sampling = tuple(dict.fromkeys(sampling))  # the first is the default; duplicates compile once
        if not self.sampling:
            raise PosiError("no sampling settings to serve")
        self.probes = self._length_probes()  # (shared prefix, padded prompt length) -> a prompt that has it
        context = rewriter.model.config.max_position_embeddings
        for cfg in self.sampling:
            if max(self.lengths) + cfg.max_new_tokens > context:
                raise PosiError(f"prompts of {config.max_prompt_tokens} tokens (padded to {max(self.lengths)} with "
                                f"the instruction) + {cfg.max_new_tokens} new tokens exceed the model's context of "
                                f"{context}; lower --max-prompt-tokens or --max-new-tokens")
        self._seed = seed
        self._queue: list[_Item] = []
        self._pending = 0  # live items in the queue
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._device = ThreadPoolExecutor(1, thread_name_prefix="rewriter")
        self._batch_s = 1.0  # running estimate of one batch's wall time, for Retry-After

    # --- shapes -------------------------------------------------------------------------------------------------
    @property
    def default_sampling(self) -> SamplingConfig:
        return self.sampling[0]

    @property
    def lengths(self) -> tuple[int, ...]:
        """The compiled padded prompt lengths."""
        return tuple(sorted(length for _, length in self.probes))

    @property
    def shapes(self) -> int:
        return len(self.sampling) * len(self.probes) * len(self.config.batch_sizes)

    def _length_probes(self) -> dict[tuple[int, int], str]:
        """A prompt for each layout a served prompt can reach: the first k words of a plain sentence (the model ends
        its rewrite soon, so the warm-up runs are short), k growing until the token limit."""
        probes: dict[tuple[int, int], str] = {}
        words = (_PROBE_SENTENCE * (1 + self.config.max_prompt_tokens // 8)).split()
        for k in range(1, len(words) + 1):
            text = " ".join(words[:k])
            if len(self.rewriter.tokenizer.encode(text)) > self.config.max_prompt_tokens:
                break
            probes.setdefault(self._layout(text), text)
        return probes

    def _layout(self, prompt: str) -> tuple[int, int]:
        return self.rewriter.layout([self.rewriter.chat_tokens(prompt)])

    def warm_up(self, progress: Callable[[str], None] | None = None) -> dict:
        """Run every served shape once (compiling it); returns the shapes, seconds and compilations it took."""
        t0, c0 = time.perf_counter(), compilations()
        done = 0
        for cfg in self.sampling:
            for (_, length), probe in sorted(self.probes.items()):
                for size in self.config.batch_sizes:
                    t = time.perf_counter()
                    self.rewriter.rewrite_detailed([probe] * size, self.config.decoding(cfg, size), seed=0)
                    done += 1
                    if progress is not None:
                        progress(f"warm-up {done}/{self.shapes}: batch {size} x {length} tokens "
                                 f"({describe_sampling(cfg)}) in {time.perf_counter() - t:.1f} s")
        if self.metrics is not None:
            self.metrics.warmed_up()
        return {"shapes": self.shapes, "seconds": time.perf_counter() - t0, "compilations": compilations() - c0}

    # --- admission ----------------------------------------------------------------------------------------------
    def sampling_for(self, overrides: dict) -> SamplingConfig:
        """The served sampling settings the request's overrides select (PosiError if they are not compiled)."""
        if not overrides:
            return self.default_sampling
        cfg = dataclasses.replace(self.default_sampling, **overrides)  # validates (PosiError)
        if cfg not in self.sampling:
            served = "; ".join(f"{{{describe_sampling(s)}}}" for s in self.sampling)
            raise PosiError(f"sampling settings {{{describe_sampling(cfg)}}} are not served (each is a compiled "
                            f"program, built at start-up): this server serves {served}")
        return cfg

    def check(self, prompts) -> list[str]:
        """The prompts, if each can be rewritten by a compiled shape; PosiError naming the first that cannot."""
        prompts = check_prompts(prompts)
        limit = self.config.max_prompt_tokens
        for i, p in enumerate(prompts, 1):
            if len(p) > limit * _CHARS_PER_TOKEN_LIMIT:
                raise PosiError(f"prompt {i} is {len(p)} characters long; this server takes at most {limit} tokens")
            n = len(self.rewriter.tokenizer.encode(p.strip()))
            if n > limit:
                raise PosiError(f"prompt {i} is {n} tokens long; this server takes at most {limit}")
            if self._layout(p) not in self.probes:
                raise PosiError(f"prompt {i} ({n} tokens) needs a shape this server did not compile; shorten it")
        return prompts

    # --- the queue ----------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._pending

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="rewrite-batcher")

    async def close(self) -> None:
        """Finish every queued prompt, then stop (requests still waiting get their results)."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
            self._task = None
        self._device.shutdown(wait=True)

    async def rewrite(self, prompts: list[str], sampling: SamplingConfig) -> list[Rewrite]:
        """Queue checked prompts and wait for their rewrites. QueueFull if they do not fit; cancelling the call
        (the request's timeout) withdraws the prompts not yet in a batch."""
        if self._task is None or self._closing:
            raise QueueFull(1)
        if self._pending + len(prompts) > self.config.max_queue:
            batches_ahead = math.ceil(self._pending / self.config.max_batch) + 1
            raise QueueFull(max(1, math.ceil(batches_ahead * self._batch_s)))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(p, sampling, loop.create_future(), now) for p in prompts]
        self._queue.extend(items)
        self._pending += len(items)
        self._update_depth()
        self._wake.set()
        try:
            return list(await asyncio.gather(*(it.future for it in items)))
        except asyncio.CancelledError:  # (gather has cancelled the futures too; queued ones must leave the queue)
            for it in items:
                it.cancelled = True
            queued = len(self._queue)
            self._queue = [it for it in self._queue if not it.cancelled]
            self._pending -= queued - len(self._queue)
            self._update_depth()
            raise

    def _update_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._pending)

    def _oldest(self) -> _Item | None:
        while self._queue and self._queue[0].cancelled:
            self._queue.pop(0)
        return self._queue[0] if self._queue else None

    def _live(self, sampling: SamplingConfig) -> int:
        return sum(1 for it in self._queue if not it.cancelled and it.sampling == sampling)

    def _take(self, sampling: SamplingConfig) -> list[_Item]:
        batch, rest = [], []
        for it in self._queue:
            if it.cancelled:
                continue
            if it.sampling == sampling and len(batch) < self.config.max_batch:
                batch.append(it)
            else:
                rest.append(it)
        self._queue = rest
        self._pending -= len(batch)
        self._update_depth()
        return batch

    async def _run(self) -> None:
        max_wait = self.config.max_wait_ms / 1000
        while True:
            first = self._oldest()
            if first is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = first.enqueued + max_wait
            while not first.cancelled and not self._closing and self._live(first.sampling) < self.config.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(first.sampling)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[_Item]) -> None:
        size = self.config.bucket(len(batch))
        prompts = [it.prompt for it in batch] + [batch[0].prompt] * (size - len(batch))
        seed, self._seed = self._seed, (self._seed + 1) % 2**31
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._device, partial(self.rewriter.rewrite_detailed, prompts,
                                      self.config.decoding(batch[0].sampling, size), seed))
        except Exception as e:  # a device or model failure: this batch's requests get it, the server lives on
            log.exception("rewriter batch of %d failed", len(batch))
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        self._batch_s = 0.7 * self._batch_s + 0.3 * seconds
        for it, result in zip(batch, results):
            if not it.future.done():
                it.future.set_result(result)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_seconds.observe(seconds)
            self.metrics.padded_rows.inc(size - len(batch))
        log.debug("batch of %d (compiled size %d) in %.2f s", len(batch), size, seconds)
