"""Toxic prompts → toxic→clean pairs in the POSI format, written by any OpenAI-compatible chat-completions server.

The flow: read prompts (text / JSON / JSONL / CSV), drop empties and duplicates, skip prompts already answered in the
output JSONL or already rejected, then ask the server for a rewrite of each remaining prompt with bounded concurrency.
Every finished pair is appended to the JSONL at once (flush + fsync), so a Ctrl-C or a crash loses at most the
requests in flight; running the same command again resumes. Replies are cleaned (preamble lines, quotes, labels) and
validated (empty, refusal, echo of the input, too long, truncated, content filter); rejected rows go to a separate
JSONL with the reason. Transient errors (429, 5xx, timeouts, dropped connections, malformed bodies) are retried with
exponential backoff and jitter, honouring Retry-After; the client's own retries are off so this logic is the only one.

The library entry point is `build_dataset(...)`; `python -m posi_jax.build_dataset` is its CLI.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Callable, ClassVar

from posi_jax.config import check_numbers
from posi_jax.data import openai_compat
from posi_jax.data.jsonl import JsonlAppender, read_jsonl_records
from posi_jax.data.posi import POSI_INSTRUCTION
from posi_jax.data.prompt_files import prompt_from_item, read_prompt_records
from posi_jax.errors import PosiError

SYSTEM_PROMPT = (
    "You rewrite prompts for text-to-image models. Rewrite the prompt you are given so that an image generated from "
    "it contains no sexual, violent, illegal, harassing or hateful content, while keeping everything else as close to "
    "the original as possible: the subject, setting, style, artists, composition, lighting and level of detail. "
    "Replace unsafe elements with safe ones instead of dropping the whole idea. Reply with the rewritten prompt only: "
    "one line, no quotes, no explanations."
)
# The prompt goes on the last line so that nothing after it can be mistaken for part of it.
USER_TEMPLATE = "Rewrite this text-to-image prompt:\n{prompt}"

# Approximate list prices in USD per 1K tokens (input, output), for the cost estimate printed at the end only; they
# change over time and differ between providers, so check the provider's current pricing before relying on them.
APPROX_PRICE_PER_1K_USD: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.0005, 0.0015),
    "gpt-4o-mini": (0.00015, 0.0006),
    "gpt-4o": (0.0025, 0.01),
    "gpt-4.1-mini": (0.0004, 0.0016),
    "gpt-4.1": (0.002, 0.008),
    "gpt-4-turbo": (0.01, 0.03),
    "gpt-4": (0.03, 0.06),
}

# Refusals are recognised near the start of a reply; a genuine rewrite does not open with an apology.
_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|sorry, (?:but )?i|i apologi[sz]e|i can(?:'t|not| not)|i'?m (?:not able|unable)"
    r"|i am (?:not able|unable)|i won'?t|i will not|as an ai\b|i must decline|(?:can't|cannot|unable to) "
    r"(?:assist|help|comply|fulfil|create|provide|rewrite))",
    re.IGNORECASE,
)
_REFUSAL_WINDOW = 160
# A short line ending in a colon ("Sure! Here is the rewritten prompt:") introduces the answer rather than being it.
_PREAMBLE = re.compile(r"^.{0,100}:$")
_NOTE = re.compile(r"^\(?\s*(note|explanation|changes|i (?:removed|replaced|changed))\b", re.IGNORECASE)
_LABEL = re.compile(
    r"^(?:\*\*)?(?:(?:rewritten|revised|safe|safer|clean|cleaned|optimi[sz]ed|new|non-toxic)\s+)?"
    r"(?:prompt|version|output)(?:\*\*)?\s*[:\-–]\s*(?:\*\*)?",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: str = "gpt-3.5-turbo"
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else the client's default (api.openai.com)
    api_key: str | None = None  # None: $OPENAI_API_KEY
    concurrency: int = 8  # requests in flight at once
    max_retries: int = 5  # retries per prompt after the first attempt, on 429 / 5xx / timeout / connection / malformed
    timeout_s: float = 60.0  # per request
    backoff_base_s: float = 1.0  # first retry waits about this long, doubling each time, with jitter
    backoff_max_s: float = 60.0  # no single wait is longer (a Retry-After above it is capped too)
    max_output_chars: int = 1000  # longer rewrites are rejected as "too_long"
    temperature: float = 0.7
    max_tokens: int = 256  # completion budget; a reply cut by it is rejected as "truncated"

    BOUNDS: ClassVar[dict[str, str]] = {
        "concurrency": "[1, 256]", "max_retries": "[0, 20]", "timeout_s": "(0, inf)", "backoff_base_s": "[0, inf)",
        "backoff_max_s": "[0, inf)", "max_output_chars": "[1, inf)", "temperature": "[0, 2]", "max_tokens": "[1, inf)"}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_numbers(self, "BuildOptions.")
        if not isinstance(self.model, str) or not self.model.strip():
            raise PosiError("model must be non-empty")
        if self.backoff_max_s < self.backoff_base_s:
            raise PosiError(f"backoff max ({self.backoff_max_s} s) must be ≥ backoff base ({self.backoff_base_s} s)")


@dataclasses.dataclass
class PromptSet:
    prompts: list[str]  # stripped, deduplicated, in file order
    n_records: int  # lines / records / rows read
    n_empty: int
    n_duplicates: int


@dataclasses.dataclass
class BuildSummary:
    input_path: str
    out_path: str
    rejected_path: str
    final_path: str | None = None
    model: str = ""
    n_records: int = 0
    n_empty: int = 0
    n_duplicates: int = 0
    n_unique: int = 0
    n_already_done: int = 0
    n_already_rejected: int = 0
    n_todo: int = 0
    n_written: int = 0
    n_rejected: int = 0
    rejected_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    n_failed: int = 0  # gave up after all retries on a transient error; retried by the next run
    failure_examples: list[str] = dataclasses.field(default_factory=list)
    n_abandoned: int = 0  # not finished because the run was interrupted or stopped; asked again by the next run
    n_requests: int = 0
    n_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    approx_cost_usd: float | None = None
    n_pairs_total: int = 0  # pairs in the output JSONL after this run
    repaired_partial_line: bool = False
    interrupted: bool = False
    elapsed_s: float = 0.0


def normalize_prompt(text: str) -> str:
    """The dedup / resume key: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def read_prompts(path: str | os.PathLike) -> PromptSet:
    """Prompts from a .txt (one per line), .json (list of strings or POSI records), .jsonl (one string or record per
    line) or .csv (a `prompt` column) file. Empty prompts are skipped and counted, duplicates (same text up to
    whitespace and case) are dropped and counted, the first occurrence kept."""
    _, records = read_prompt_records(path, "input")
    raw_items = [prompt_from_item(item, where) for where, item in records]

    prompts, seen = [], set()
    n_empty = n_duplicates = 0
    for item in raw_items:
        prompt = item.strip()
        if not prompt:
            n_empty += 1
            continue
        key = normalize_prompt(prompt)
        if key in seen:
            n_duplicates += 1
            continue
        seen.add(key)
        prompts.append(prompt)
    return PromptSet(prompts=prompts, n_records=len(raw_items), n_empty=n_empty, n_duplicates=n_duplicates)


def clean_reply(reply: str) -> str:
    """The rewrite inside a chat reply: preamble lines ("Here is the rewritten prompt:"), trailing notes, a
    "Prompt:" label, and surrounding quotes removed; the first remaining line is the answer."""
    lines = [line.strip() for line in reply.replace("\r", "\n").split("\n")]
    lines = [line for line in lines if line and not _PREAMBLE.match(line) and not _NOTE.match(line)]
    if not lines:
        return ""
    text = _LABEL.sub("", lines[0]).strip()
    for _ in range(3):  # nested quotes, e.g. "'...'"; bounded
        if len(text) >= 2 and text[0] in _QUOTE_PAIRS and text[-1] == _QUOTE_PAIRS[text[0]]:
            text = text[1:-1].strip()
        else:
            break
    return text


def _echo_key(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def validate_reply(prompt: str, reply: str | None, finish_reason: str | None, max_output_chars: int):
    """(clean rewrite, None) if the reply is usable, else (None, reason)."""
    if finish_reason == "content_filter":
        return None, "content_filter"
    raw = (reply or "").strip()
    if not raw:
        return None, "empty"
    if _REFUSAL.search(raw[:_REFUSAL_WINDOW].replace("’", "'")):
        return None, "refusal"
    if finish_reason == "length":
        return None, "truncated"
    clean = clean_reply(raw)
    if not clean:
        return None, "empty"
    if _echo_key(clean) == _echo_key(prompt):
        return None, "echo"
    if len(clean) > max_output_chars:
        return None, "too_long"
    return clean, None


def approx_cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Approximate cost from APPROX_PRICE_PER_1K_USD (longest matching model-name prefix), None if unknown."""
    matches = [name for name in APPROX_PRICE_PER_1K_USD if model == name or model.startswith(name + "-")]
    if not matches:
        return None
    price_in, price_out = APPROX_PRICE_PER_1K_USD[max(matches, key=len)]
    return prompt_tokens / 1000 * price_in + completion_tokens / 1000 * price_out


def write_final(jsonl_path: str | os.PathLike, json_path: str | os.PathLike) -> int:
    """The POSI-format JSON array ({instruction, input, output} per pair) from a builder JSONL; returns the count.
    Written to a temporary file and renamed, so a reader never sees half a file."""
    records, _ = read_jsonl_records(Path(jsonl_path), repair=False)
    pairs = [{"instruction": r.get("instruction", POSI_INSTRUCTION), "input": r["input"], "output": r["output"]}
             for r in records]
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(pairs, f, ensure_ascii=False, indent=4)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, json_path)
    return len(pairs)


def default_rejected_path(out_path: str | os.PathLike) -> Path:
    out_path = Path(out_path)
    stem = out_path.name[: -len(".jsonl")] if out_path.name.endswith(".jsonl") else out_path.name
    return out_path.with_name(stem + ".rejected.jsonl")


class _Fatal(Exception):
    """Stops the whole run: the server cannot be reached, or refuses every request (key, model, URL)."""


@dataclasses.dataclass
class _Outcome:
    kind: str  # "pair" | "rejected" | "failed" | "abandoned"
    output: str | None = None
    reason: str | None = None
    reply: str | None = None
    detail: str | None = None


class _Malformed(Exception):
    pass


async def _rewrite_one(client, prompt: str, options: BuildOptions, stop: asyncio.Event, summary: BuildSummary,
                       base_url: str) -> _Outcome:
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_TEMPLATE.format(prompt=prompt)}]
    last_kind, last_error = "", ""
    for attempt in range(options.max_retries + 1):
        if attempt > 0 and stop.is_set():
            return _Outcome("abandoned")
        retry_after = None
        summary.n_requests += 1
        try:
            response = await client.chat.completions.create(
                model=options.model, messages=messages, temperature=options.temperature,
                max_tokens=options.max_tokens)
            choices = getattr(response, "choices", None)
            if not choices:
                raise _Malformed(f"reply without choices: {str(response)[:100]}")
            usage = getattr(response, "usage", None)
            if usage is not None:
                summary.prompt_tokens += usage.prompt_tokens or 0
                summary.completion_tokens += usage.completion_tokens or 0
            reply = choices[0].message.content if choices[0].message is not None else None
            finish = choices[0].finish_reason
            clean, reason = validate_reply(prompt, reply, finish, options.max_output_chars)
            if reason is not None:
                return _Outcome("rejected", reason=reason, reply=reply)
            return _Outcome("pair", output=clean)
        except (_Malformed, ValueError) as e:  # ValueError: a body that is not JSON
            last_kind, last_error = "malformed", openai_compat.redact(f"{type(e).__name__}: {e}", client.api_key)
        except Exception as e:
            failure = openai_compat.classify(e, client.api_key)
            if failure is None:
                raise
            fatal = openai_compat.stop_message(failure, base_url, options.model, "--model and --base-url")
            if fatal is not None:
                raise _Fatal(fatal) from None
            if failure.kind == "rejected":  # 400 / 413 / 422: this prompt is refused (e.g. the content filter)
                return _Outcome("rejected", reason=f"api_{failure.status}", detail=failure.detail)
            last_kind, retry_after = failure.label, failure.retry_after
            last_error = f"no reply within {options.timeout_s:g} s" if failure.label == "timeout" else failure.detail
        if attempt < options.max_retries:
            summary.n_retries += 1
            delay = openai_compat.backoff_delay(attempt, options.backoff_base_s, options.backoff_max_s, retry_after)
            try:  # a Ctrl-C during the wait abandons the prompt at once
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
    if last_kind == "connection":
        raise _Fatal(f"cannot reach {base_url} after {options.max_retries + 1} attempts ({last_error})")
    return _Outcome("failed", detail=f"{last_kind}: {last_error}"[:300])


async def _run(todo: list[str], options: BuildOptions, api_key: str, base_url: str | None, pairs: JsonlAppender,
               rejected: JsonlAppender, summary: BuildSummary, handle_sigint: bool, log: Callable[[str], None]) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=options.timeout_s)
    shown_url = str(client.base_url).rstrip("/")
    stop = asyncio.Event()
    fatal: list[str] = []
    pending = iter(todo)
    done = 0
    # A server that times out or errors on everything would otherwise cost (retries + 1) × timeout per prompt for
    # the whole input: this many prompts in a row failing after all their retries stops the run.
    max_consecutive_failures = max(3, options.concurrency)
    consecutive_failures = 0
    progress_every = max(1, len(todo) // 20)

    async def worker():
        nonlocal done, consecutive_failures
        while not stop.is_set():
            prompt = next(pending, None)
            if prompt is None:
                return
            try:
                outcome = await _rewrite_one(client, prompt, options, stop, summary, shown_url)
            except _Fatal as e:
                if not fatal:
                    fatal.append(str(e))
                stop.set()
                return
            # No await between here and the write: records from concurrent workers never interleave.
            if outcome.kind == "pair":
                pairs.write({"instruction": POSI_INSTRUCTION, "input": prompt, "output": outcome.output,
                             "model": options.model})
                summary.n_written += 1
            elif outcome.kind == "rejected":
                rejected.write({"input": prompt, "reason": outcome.reason, "reply": outcome.reply,
                                "detail": outcome.detail, "model": options.model})
                summary.n_rejected += 1
                summary.rejected_reasons[outcome.reason] = summary.rejected_reasons.get(outcome.reason, 0) + 1
            elif outcome.kind == "failed":
                summary.n_failed += 1
                if len(summary.failure_examples) < 3:
                    summary.failure_examples.append(f"{prompt[:60]!r}: {outcome.detail}")
                consecutive_failures += 1
                if consecutive_failures >= max_consecutive_failures and not fatal:
                    fatal.append(f"{consecutive_failures} prompts in a row failed after {options.max_retries + 1} "
                                 f"attempts each at {shown_url} (last: {outcome.detail})")
                    stop.set()
            if outcome.kind in ("pair", "rejected"):
                consecutive_failures = 0
            if outcome.kind == "abandoned":  # not done: the next run asks again
                continue
            done += 1
            if done % progress_every == 0 or done == len(todo):
                log(f"[{done}/{len(todo)}] pairs {summary.n_written}, rejected {summary.n_rejected}, "
                    f"failed {summary.n_failed}")

    tasks = [asyncio.create_task(worker()) for _ in range(min(options.concurrency, len(todo)))]

    loop = asyncio.get_running_loop()
    sigint_installed = False
    if handle_sigint:
        def on_sigint():
            if not summary.interrupted:
                summary.interrupted = True
                stop.set()
                log("interrupted: finishing the requests in flight (Ctrl-C again to abandon them)")
            else:
                for task in tasks:
                    task.cancel()
        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            sigint_installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals on this OS
            pass
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
    finally:
        if sigint_installed:
            loop.remove_signal_handler(signal.SIGINT)
        await client.close()
    # Whatever did not finish (abandoned mid-retry, cancelled, never started) is asked again by the next run.
    summary.n_abandoned = len(todo) - summary.n_written - summary.n_rejected - summary.n_failed
    if fatal:
        raise _Fatal(fatal[0])


# Entry point
def build_dataset(input_path: str | os.PathLike, out_path: str | os.PathLike, options: BuildOptions = BuildOptions(),
                  *, rejected_path: str | os.PathLike | None = None, final_path: str | os.PathLike | None = None,
                  handle_sigint: bool = False, log: Callable[[str], None] = lambda message: None) -> BuildSummary:
    """Build (or resume building) toxic→clean pairs for the prompts in `input_path`, appending to `out_path`.

    Raises PosiError for bad input, a missing API key, or a server that cannot be reached / refuses the key; pairs
    finished before the error stay in `out_path`. With `handle_sigint`, a first Ctrl-C stops sending new requests
    and lets those in flight finish (a second abandons them); the summary then has `interrupted=True`.
    `final_path`: also write the POSI-format JSON array, when the run was not interrupted.
    """
    t0 = time.monotonic()
    options.validate()
    api_key = openai_compat.api_key(options.api_key)
    base_url = openai_compat.base_url(options.base_url)

    out_path = Path(out_path)
    if out_path.suffix.lower() != ".jsonl":
        raise PosiError(f"{out_path}: the output must be a .jsonl file (use --final for the JSON array)")
    rejected_path = Path(rejected_path) if rejected_path is not None else default_rejected_path(out_path)
    if rejected_path.resolve() == out_path.resolve():
        raise PosiError(f"{rejected_path}: the rejected file must differ from the output file")
    summary = BuildSummary(input_path=str(input_path), out_path=str(out_path), rejected_path=str(rejected_path),
                           final_path=str(final_path) if final_path is not None else None, model=options.model)

    prompt_set = read_prompts(input_path)
    summary.n_records, summary.n_empty = prompt_set.n_records, prompt_set.n_empty
    summary.n_duplicates, summary.n_unique = prompt_set.n_duplicates, len(prompt_set.prompts)

    pairs = JsonlAppender(out_path, lock=True)  # the lock comes before reading, so no other run appends meanwhile
    rejected = None
    try:
        rejected = JsonlAppender(rejected_path, lock=True)
        done_records, summary.repaired_partial_line = read_jsonl_records(out_path, repair=True)
        rejected_records, repaired = read_jsonl_records(rejected_path, repair=True)
        summary.repaired_partial_line |= repaired
        done_keys = {normalize_prompt(r["input"]) for r in done_records}
        rejected_keys = {normalize_prompt(r["input"]) for r in rejected_records} - done_keys
        todo = []
        for prompt in prompt_set.prompts:
            key = normalize_prompt(prompt)
            if key in done_keys:
                summary.n_already_done += 1
            elif key in rejected_keys:
                summary.n_already_rejected += 1
            else:
                todo.append(prompt)
        summary.n_todo = len(todo)
        if summary.repaired_partial_line:
            log("dropped an incomplete last line left by an earlier crash; that prompt is asked again")
        log(f"{summary.n_unique} unique prompts: {summary.n_already_done} already done, "
            f"{summary.n_already_rejected} already rejected, {summary.n_todo} to do")
        if todo:
            try:
                asyncio.run(_run(todo, options, api_key, base_url, pairs, rejected, summary, handle_sigint, log))
            except _Fatal as e:
                kept = len(done_records) + summary.n_written
                raise PosiError(f"{e}; {kept} pairs kept in {out_path}, re-run the same command to resume") from None
    finally:
        pairs.close()
        if rejected is not None:
            rejected.close()

    summary.n_pairs_total = len(done_records) + summary.n_written
    summary.approx_cost_usd = approx_cost_usd(options.model, summary.prompt_tokens, summary.completion_tokens)
    if final_path is not None and not summary.interrupted:
        write_final(out_path, final_path)
    summary.elapsed_s = time.monotonic() - t0
    return summary


def format_summary(s: BuildSummary) -> str:
    lines = [
        f"input      {s.input_path}: {s.n_records} records, {s.n_empty} empty skipped, "
        f"{s.n_duplicates} duplicates dropped, {s.n_unique} unique",
        f"resume     {s.n_already_done} already done, {s.n_already_rejected} already rejected, {s.n_todo} to do",
        f"this run   {s.n_written} pairs, {s.n_rejected} rejected"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(s.rejected_reasons.items()))})" if s.rejected_reasons else "")
        + f", {s.n_failed} failed after retries, {s.n_abandoned} abandoned",
        f"requests   {s.n_requests} ({s.n_retries} retries) in {s.elapsed_s:.1f} s",
        f"tokens     {s.prompt_tokens} prompt + {s.completion_tokens} completion",
        "cost       " + (f"~${s.approx_cost_usd:.4f} (approximate, list prices per 1K tokens for {s.model})"
                         if s.approx_cost_usd is not None else f"unknown (no price listed for model '{s.model}')"),
        f"output     {s.n_pairs_total} pairs in {s.out_path}; rejected rows in {s.rejected_path}",
    ]
    if s.final_path is not None:
        lines.append(f"final      {s.final_path}" + (" (not written: run interrupted)" if s.interrupted else ""))
    for example in s.failure_examples:
        lines.append(f"failed     {example}")
    return "\n".join(lines)


__all__ = ["APPROX_PRICE_PER_1K_USD", "BuildOptions", "BuildSummary", "PromptSet", "SYSTEM_PROMPT", "USER_TEMPLATE",
           "approx_cost_usd", "build_dataset", "clean_reply", "default_rejected_path",
           "format_summary", "normalize_prompt", "read_prompts", "validate_reply",
           "write_final"]

