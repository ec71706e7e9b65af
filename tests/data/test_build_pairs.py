"""Dataset builder against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/fake_openai_server.py), spoken
to by the real `openai` client: retries, rejections, resume after SIGINT / SIGKILL, and the bad-input errors."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posi_jax import build_dataset as cli
from posi_jax.data.build_pairs import (
    BuildOptions, approx_cost_usd, build_dataset, clean_reply, default_rejected_path, normalize_prompt, read_prompts,
    validate_reply)
from posi_jax.data.jsonl import JsonlAppender
from posi_jax.data.openai_compat import backoff_delay, parse_retry_after
from posi_jax.data.posi import POSI_INSTRUCTION
from posi_jax.errors import PosiError
from tests.conftest import REPO, default_sigint
from tests.fake_openai_server import SAFE_PREFIX, FakeOpenAI
POSI_DATA = REPO.parent / "shared" / "data" / "posi"
# Small waits so the whole file runs in seconds; the retry logic is the same as with the defaults.
FAST = dict(backoff_base_s=0.01, backoff_max_s=5.0, timeout_s=2.0)


def prompts_file(tmp_path: Path, prompts: list[str], name="in.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a JSONL line without its newline"
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def assert_each_once(out: Path, prompts: list[str]):
    records = read_jsonl(out)
    inputs = [r["input"] for r in records]
    assert sorted(inputs) == sorted(prompts), "every prompt exactly once, none lost, none duplicated"
    for r in records:
        assert r["output"] == SAFE_PREFIX + r["input"]
        assert r["instruction"] == POSI_INSTRUCTION
    return records


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# Requests over HTTP
# ----------------------------------------------------------------------------------------------------------------
def test_all_pairs_written_once_and_transient_errors_recovered(fake, tmp_path):
    prompts = [f"item-{i:02d} a gory scene number {i}" for i in range(16)]
    # duplicates (case / whitespace) and empty lines in the input are dropped and counted
    src = prompts_file(tmp_path, prompts + ["", "   ", "ITEM-03  a gory   scene number 3", prompts[5]])
    fake.script({
        "item-01 ": ["429", "ok"],  # Retry-After: 1 must be honoured although the backoff base is 0.01 s
        "item-02 ": ["500", "500", "ok"],
        "item-03 ": ["malformed", "ok"],
        "item-04 ": ["slow", "ok"],  # beyond the client timeout
        "item-05 ": ["drop", "ok"],  # connection closed without a response
        "item-06 ": ["junk"],  # chatty multi-line reply with quotes: cleaned, accepted
    })
    fake.slow_s = 1.0
    out = tmp_path / "pairs.jsonl"
    options = BuildOptions(concurrency=4, max_retries=3, temperature=0.3, max_tokens=99,
                           base_url=fake.base_url, **{**FAST, "timeout_s": 0.4})
    summary = build_dataset(src, out, options, final_path=tmp_path / "pairs.json")

    assert_each_once(out, prompts)
    assert (summary.n_records, summary.n_empty, summary.n_duplicates, summary.n_unique) == (20, 2, 2, 16)
    assert (summary.n_written, summary.n_rejected, summary.n_failed, summary.n_abandoned) == (16, 0, 0, 0)
    assert summary.n_retries == 1 + 2 + 1 + 1 + 1
    assert summary.n_requests == len(fake.log) == 16 + summary.n_retries
    assert [r["behaviour"] for r in fake.attempts("item-02 ")] == ["500", "500", "ok"]
    t429 = [r["t"] for r in fake.attempts("item-01 ")]
    print(f"gap after 429 with Retry-After: 1 -> {t429[1] - t429[0]:.3f} s")
    assert t429[1] - t429[0] >= 0.95
    assert fake.max_in_flight <= 4
    # what was sent: key, model, sampling settings, the system prompt
    assert {r["auth"] for r in fake.log} == {"Bearer sk-test"}
    assert {(r["model"], r["temperature"], r["max_tokens"]) for r in fake.log} == {("gpt-3.5-turbo", 0.3, 99)}
    assert all("sexual" in r["system"][0] and "style" in r["system"][0] for r in fake.log)
    # usage counts every successful HTTP reply (the server's usage numbers), and the approximate cost follows
    assert summary.prompt_tokens == sum(40 + len(p) // 4 for p in prompts)
    assert summary.approx_cost_usd == pytest.approx(
        summary.prompt_tokens / 1000 * 0.0005 + summary.completion_tokens / 1000 * 0.0015)
    # the final file is the POSI format exactly
    final = json.loads((tmp_path / "pairs.json").read_text())
    assert len(final) == 16 and all(set(r) == {"instruction", "input", "output"} for r in final)
    assert all(r["instruction"] == POSI_INSTRUCTION for r in final)

    # a second run has nothing to do and sends nothing
    n_before = len(fake.log)
    again = build_dataset(src, out, options)
    assert (again.n_already_done, again.n_todo, again.n_requests) == (16, 0, 0)
    assert len(fake.log) == n_before
    assert_each_once(out, prompts)


def test_progress_does_not_count_abandoned_prompts(fake, tmp_path):
    """Three prompts in a row failing stop the run while another waits out a Retry-After: that one is abandoned (asked
    again by the next run), and the progress lines count only the three that finished."""
    fake.retry_after = "30"
    fake.script({"wait-": ["429"], "bad-": ["500"]})
    src = prompts_file(tmp_path, ["wait-0 a riot", "bad-0 a fight", "bad-1 a fight", "bad-2 a fight"])
    lines = []
    options = BuildOptions(concurrency=3, max_retries=1, backoff_base_s=0.01, backoff_max_s=5.0, timeout_s=2.0,
                           base_url=fake.base_url)
    with pytest.raises(PosiError, match="3 prompts in a row failed"):
        build_dataset(src, tmp_path / "o.jsonl", options, log=lines.append)
    progress = [line for line in lines if line.startswith("[")]
    assert progress[-1].startswith("[3/4] pairs 0, rejected 0, failed 3"), progress


def test_concurrency_is_bounded(fake, tmp_path):
    fake.delay_s = 0.1
    prompts = [f"item-{i:02d} scene" for i in range(12)]
    summary = build_dataset(prompts_file(tmp_path, prompts), tmp_path / "o.jsonl",
                            BuildOptions(concurrency=3, base_url=fake.base_url, **FAST))
    assert summary.n_written == 12
    print(f"max requests in flight: {fake.max_in_flight} (concurrency 3)")
    assert fake.max_in_flight == 3


def test_bad_replies_land_in_rejected_file_with_reasons(fake, tmp_path):
    behaviours = ["refusal", "echo", "empty", "long", "filtered", "400", "ok"]
    prompts = [f"item-{b} a violent prompt" for b in behaviours]
    fake.script({f"item-{b} ": [b] for b in behaviours})
    out = tmp_path / "o.jsonl"
    options = BuildOptions(base_url=fake.base_url, max_output_chars=500, **FAST)
    summary = build_dataset(prompts_file(tmp_path, prompts), out, options)

    assert [r["input"] for r in read_jsonl(out)] == ["item-ok a violent prompt"]
    rejected = {r["input"].split()[0]: r for r in read_jsonl(default_rejected_path(out))}
    reasons = {k: r["reason"] for k, r in rejected.items()}
    assert reasons == {"item-refusal": "refusal", "item-echo": "echo", "item-empty": "empty",
                       "item-long": "too_long", "item-filtered": "content_filter", "item-400": "api_400"}
    assert rejected["item-refusal"]["reply"].startswith("I'm sorry")
    assert "safety system" in rejected["item-400"]["detail"]
    assert summary.rejected_reasons == {v: 1 for v in reasons.values()}
    # rejected prompts are not asked again on resume
    n_before = len(fake.log)
    again = build_dataset(prompts_file(tmp_path, prompts), out, options)
    assert (again.n_already_done, again.n_already_rejected, again.n_requests) == (1, 6, 0)
    assert len(fake.log) == n_before


def test_prompt_failing_all_retries_is_left_for_the_next_run(fake, tmp_path):
    prompts = [f"item-{i} castle" for i in range(4)]
    fake.script({"item-2 ": ["500"]})  # always 500
    out = tmp_path / "o.jsonl"
    options = BuildOptions(base_url=fake.base_url, max_retries=2, **FAST)
    summary = build_dataset(prompts_file(tmp_path, prompts), out, options)
    assert (summary.n_written, summary.n_failed) == (3, 1)
    assert len(fake.attempts("item-2 ")) == 3  # 1 + max_retries
    assert "http_500" in summary.failure_examples[0]
    assert not default_rejected_path(out).read_text()  # a transient failure is not a rejection
    fake.script({})
    again = build_dataset(prompts_file(tmp_path, prompts), out, options)
    assert (again.n_already_done, again.n_written, again.n_requests) == (3, 1, 1)
    assert_each_once(out, prompts)


def test_server_failing_everything_stops_the_run(fake, tmp_path):
    prompts = [f"item-{i} castle" for i in range(8)]
    fake.script({"": ["500"]})
    options = BuildOptions(base_url=fake.base_url, concurrency=1, max_retries=1, **FAST)
    with pytest.raises(PosiError, match=r"3 prompts in a row failed after 2 attempts each .*http_500.*0 pairs kept"):
        build_dataset(prompts_file(tmp_path, prompts), tmp_path / "o.jsonl", options)
    assert len(fake.log) == 3 * 2  # not 8 * 2


def test_server_dropping_connections_stops_the_run_and_keeps_finished_pairs(fake, tmp_path):
    prompts = [f"item-{i} castle" for i in range(6)]
    fake.script({"item-3 ": ["drop"]})  # the server goes away for good at the 4th prompt
    out = tmp_path / "o.jsonl"
    options = BuildOptions(base_url=fake.base_url, concurrency=1, max_retries=2, **FAST)
    with pytest.raises(PosiError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1 after 3 attempts.*3 pairs kept"):
        build_dataset(prompts_file(tmp_path, prompts), out, options)
    assert [r["input"] for r in read_jsonl(out)] == prompts[:3]
    fake.script({})
    build_dataset(prompts_file(tmp_path, prompts), out, options)
    assert_each_once(out, prompts)


def test_wrong_key_is_a_clear_error(fake, tmp_path):
    fake.script({"": ["401"]})
    with pytest.raises(PosiError, match=r"refused the API key \(HTTP 401\)"):
        build_dataset(prompts_file(tmp_path, ["a", "b"]), tmp_path / "o.jsonl",
                      BuildOptions(base_url=fake.base_url, **FAST))
    assert len(fake.log) <= 2  # stops at once, no retries


def test_second_run_on_the_same_output_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "o.jsonl"
    holder = JsonlAppender(out, lock=True)  # another run holds the output
    try:
        with pytest.raises(PosiError, match="another build_dataset run is writing"):
            build_dataset(prompts_file(tmp_path, ["a"]), out, BuildOptions(base_url="http://127.0.0.1:9/v1"))
    finally:
        holder.close()


# ----------------------------------------------------------------------------------------------------------------
# Interrupted runs (a subprocess running the CLI), then resumed
# ----------------------------------------------------------------------------------------------------------------
def start_cli(fake: FakeOpenAI, src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "posi_jax.build_dataset", str(src), "--out", str(out), "--base-url", fake.base_url,
         "--concurrency", "3", "--backoff-base", "0.01", "--timeout", "5"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, f"CLI exited early: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"fewer than {n} pairs after {timeout_s} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_cli_run_resumes_without_duplicates_or_loss(fake, tmp_path, sig):
    fake.delay_s = 0.1  # 45 prompts at concurrency 3: about 1.5 s of work, so the signal lands mid-way
    prompts = [f"item-{i:02d} a bloody battlefield" for i in range(45)]
    src, out = prompts_file(tmp_path, prompts), tmp_path / "o.jsonl"
    proc = start_cli(fake, src, out)
    wait_for_lines(out, 6, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    n_done = len(read_jsonl(out))
    print(f"{sig.name}: exit {proc.returncode}, {n_done}/45 pairs written before the stop")
    assert 6 <= n_done < 45
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "interrupted" in stderr and "abandoned" in stdout
        # the requests in flight at the Ctrl-C were finished and written, not thrown away
        answered = {r["prompt"] for r in fake.log}
        assert answered == {r["input"] for r in read_jsonl(out)}
    else:
        assert proc.returncode == -signal.SIGKILL
        # a crash in the middle of a write leaves a line without its newline: the resume drops and redoes it
        with open(out, "ab") as f:
            f.write(b'{"instruction": "You are an AI visual assistant", "input": "item-')

    n_requests_before = len(fake.log)
    summary = build_dataset(src, out, BuildOptions(base_url=fake.base_url, concurrency=3, **FAST))
    assert summary.n_already_done == n_done and summary.n_written == 45 - n_done
    assert summary.repaired_partial_line == (sig == signal.SIGKILL)
    assert len(fake.log) - n_requests_before == 45 - n_done  # nothing finished is asked twice
    assert_each_once(out, prompts)


def test_second_sigint_abandons_requests_in_flight(fake, tmp_path):
    fake.delay_s = 3.0  # every answer takes 3 s
    prompts = [f"item-{i:02d} a bloody battlefield" for i in range(6)]
    src, out = prompts_file(tmp_path, prompts), tmp_path / "o.jsonl"
    proc = start_cli(fake, src, out)
    deadline = time.monotonic() + 30
    while len(fake.log) < 3 and time.monotonic() < deadline:  # three requests in flight
        assert proc.poll() is None
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    print(f"two Ctrl-C: exit {proc.returncode} {elapsed:.2f} s after the first")
    assert proc.returncode == 130 and elapsed < 2.5
    assert "0 pairs" in stdout and "6 abandoned" in stdout
    assert read_jsonl(out) == []


# ----------------------------------------------------------------------------------------------------------------
# CLI errors (in-process main(): one line on stderr, exit 2)
# ----------------------------------------------------------------------------------------------------------------
def run_main(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_missing_api_key_fails_before_any_work(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    out = tmp_path / "o.jsonl"
    code, _, err = run_main([str(prompts_file(tmp_path, ["a"])), "--out", str(out), "--base-url", fake.base_url],
                            capsys)
    assert code == 2 and err.startswith("error: no API key: set OPENAI_API_KEY") and err.count("\n") == 1
    assert fake.log == [] and not out.exists()


def test_cli_unreachable_server_keeps_partial_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "o.jsonl"
    done = {"instruction": POSI_INSTRUCTION, "input": "item-0 castle", "output": "a calm castle"}
    out.write_text(json.dumps(done) + "\n")
    port = free_closed_port()
    t0 = time.monotonic()
    code, _, err = run_main([str(prompts_file(tmp_path, ["item-0 castle", "item-1 castle"])), "--out", str(out),
                             "--base-url", f"http://127.0.0.1:{port}/v1", "--max-retries", "2",
                             "--backoff-base", "0.01", "--quiet"], capsys)
    print(f"unreachable server reported after {time.monotonic() - t0:.2f} s: {err.strip()}")
    assert code == 2 and err.count("\n") == 1
    assert f"error: cannot reach http://127.0.0.1:{port}/v1 after 3 attempts" in err
    assert "1 pairs kept" in err and "re-run" in err
    assert read_jsonl(out) == [done]


@pytest.mark.parametrize("name,content,message", [
    ("in.yaml", b"- a\n", r"unsupported input format '\.yaml'"),
    ("missing.txt", None, "input not found"),
    ("in.json", b'["a",\n "b"\n', r"not valid JSON: .* line 3"),
    ("in.json", b'{"input": "a"}', "expected a JSON list"),
    ("in.json", b'["a", 3]', r"record 1: expected a string"),
    ("in.csv", b"text,id\nhello,1\n", r"no 'prompt' column .*\['text', 'id'\]"),
    ("in.txt", b"fine\nalso fine\nbad \xff byte\n", r"line 3 is not valid UTF-8 \(byte 0xff"),
])
def test_cli_invalid_input_file(fake, tmp_path, capsys, name, content, message):
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    code, _, err = run_main([str(src), "--out", str(tmp_path / "o.jsonl"), "--base-url", fake.base_url], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(src) in err
    assert re.search(message, err), err
    assert fake.log == []


def test_cli_file_with_empty_lines_reports_counts(fake, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n\nitem-a castle\n   \nitem-b tower\n\nitem-A   Castle\n", encoding="utf-8")
    code, out, _ = run_main([str(src), "--out", str(tmp_path / "o.jsonl"), "--base-url", fake.base_url,
                             "--backoff-base", "0.01", "--quiet"], capsys)
    assert code == 0
    assert "7 records, 4 empty skipped, 1 duplicates dropped, 2 unique" in out
    assert "2 pairs" in out and "cost       ~$" in out


def test_cli_exit_code_3_when_prompts_failed(fake, tmp_path, capsys):
    fake.script({"item-b": ["500"]})
    code, _, err = run_main([str(prompts_file(tmp_path, ["item-a x", "item-b y"])), "--out",
                             str(tmp_path / "o.jsonl"), "--base-url", fake.base_url, "--max-retries", "1",
                             "--backoff-base", "0.01", "--quiet"], capsys)
    assert code == 3 and "1 prompts failed after 2 attempts" in err


# ----------------------------------------------------------------------------------------------------------------
# Input formats and pure helpers
# ----------------------------------------------------------------------------------------------------------------
def test_read_prompts_formats(tmp_path):
    (tmp_path / "a.csv").write_text('id,Prompt\n1,"a cat, sitting"\n2,\n3,"A  CAT, sitting"\n4,"two\nlines"\n')
    s = read_prompts(tmp_path / "a.csv")
    assert (s.prompts, s.n_records, s.n_empty, s.n_duplicates) == (["a cat, sitting", "two\nlines"], 4, 1, 1)
    (tmp_path / "a.jsonl").write_text('"x"\n\n{"input": "y", "output": "z"}\n{"prompt": "w"}\n')
    assert read_prompts(tmp_path / "a.jsonl").prompts == ["x", "y", "w"]
    (tmp_path / "b.json").write_text(json.dumps(["p", {"instruction": "i", "input": "q", "output": "o"}, "  "]))
    s = read_prompts(tmp_path / "b.json")
    assert (s.prompts, s.n_empty) == (["p", "q"], 1)
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\r\nworld\r\n".encode())
    assert read_prompts(tmp_path / "bom.txt").prompts == ["hello", "world"]


@pytest.mark.skipif(not (POSI_DATA / "ppo_prompts.json").exists(), reason="POSI data not present")
def test_read_prompts_accepts_the_posi_release_records():
    s = read_prompts(POSI_DATA / "ppo_prompts.json")
    records = json.loads((POSI_DATA / "ppo_prompts.json").read_text())
    assert s.n_records == len(records) == 842
    assert len(s.prompts) + s.n_duplicates + s.n_empty == 842
    assert s.prompts[0] == records[0]["input"].strip()


@pytest.mark.parametrize("reply,expected", [
    ("a calm lake at dawn", "a calm lake at dawn"),
    ('"a calm lake at dawn"', "a calm lake at dawn"),
    ("Sure! Here is the rewritten prompt:\n\n\u201ca calm lake\u201d\n\nNote: I removed the gore.", "a calm lake"),
    ("Rewritten prompt: 'a calm lake'", "a calm lake"),
    ("**Prompt:** a calm lake", "a calm lake"),
    ("a calm lake\nExplanation: removed violence", "a calm lake"),
])
def test_clean_reply(reply, expected):
    assert clean_reply(reply) == expected


@pytest.mark.parametrize("reply,finish,reason", [
    ("a calm lake", "stop", None),
    ("", "stop", "empty"),
    (None, "stop", "empty"),
    ("Here is the prompt:\n\n", "stop", "empty"),
    ("I'm sorry, but I can't assist with that.", "stop", "refusal"),
    ("I cannot create content like that.", "stop", "refusal"),
    ("Sorry, I won\u2019t rewrite this.", "stop", "refusal"),
    ("As an AI language model, I must decline.", "stop", "refusal"),
    ("A Bloody  battlefield!", "stop", "echo"),
    ('"a bloody battlefield"', "stop", "echo"),
    ("a calm lake " * 20, "stop", "too_long"),
    ("a calm la", "length", "truncated"),
    ("", "content_filter", "content_filter"),
])
def test_validate_reply(reply, finish, reason):
    clean, got = validate_reply("a bloody battlefield", reply, finish, max_output_chars=200)
    assert got == reason
    assert (clean is None) == (reason is not None)


def test_backoff_delay_and_retry_after():
    assert backoff_delay(0, 1.0, 60.0, rand=lambda: 1.0) == 1.0
    assert backoff_delay(3, 1.0, 60.0, rand=lambda: 1.0) == 8.0
    assert backoff_delay(3, 1.0, 60.0, rand=lambda: 0.0) == 4.0  # jitter keeps [d/2, d]
    assert backoff_delay(10, 1.0, 60.0, rand=lambda: 1.0) == 60.0  # capped
    assert backoff_delay(0, 0.01, 60.0, retry_after_s=2.5, rand=lambda: 1.0) == 2.5  # Retry-After wins
    assert backoff_delay(0, 0.01, 5.0, retry_after_s=3600, rand=lambda: 1.0) == 5.0  # but is capped too
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_normalize_cost_and_paths():
    assert normalize_prompt("  A  Cat\n sitting ") == normalize_prompt("a cat sitting")
    assert approx_cost_usd("gpt-3.5-turbo-0125", 1000, 1000) == pytest.approx(0.002)
    assert approx_cost_usd("gpt-4o-mini", 1000, 0) == pytest.approx(0.00015)  # not gpt-4o's price
    assert approx_cost_usd("llama-3-8b", 1000, 1000) is None
    assert default_rejected_path("d/pairs.jsonl") == Path("d/pairs.rejected.jsonl")


def test_bad_options_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    src = prompts_file(tmp_path, ["a"])
    with pytest.raises(PosiError, match="concurrency must be in"):
        build_dataset(src, tmp_path / "o.jsonl", BuildOptions(concurrency=0))
    with pytest.raises(PosiError, match="must be a .jsonl file"):
        build_dataset(src, tmp_path / "o.json", BuildOptions())
    with pytest.raises(PosiError, match="must start with http"):
        build_dataset(src, tmp_path / "o.jsonl", BuildOptions(base_url="127.0.0.1:80"))
