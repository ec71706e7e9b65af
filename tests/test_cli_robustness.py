"""Every command as a user runs it (a subprocess), under bad values and faults: one `error:` line and exit 2, never a
traceback and never exit 0 with a NaN taken; Ctrl-C while XLA compiles exits 130, never 139; an API key read from a
CRLF file is sent correctly and shows up in no output or file. (Issue 16; the config-loader and argparse properties
are in test_config_properties.py.)"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO, default_sigint

SECRET = "sk-test-SECRET123"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_llama_folder, tiny_sd_folder, data_dir):
    """The placeholders the cases use: tiny random models, a small SFT data file, a regular file, a scratch folder."""
    root = tmp_path_factory.mktemp("robust")
    data = root / "pairs.json"
    data.write_text(json.dumps(json.loads((data_dir / "sft_toxic_clean.json").read_text())[:36]))
    (root / "file").write_text("not a folder\n")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return {"llama": str(tiny_llama_folder), "sd": str(tiny_sd_folder), "data": str(data), "file": str(root / "file"),
            "prompts": str(root / "prompts.txt"), "tmp": str(root),
            "ppo_yaml": str(REPO / "configs" / "ppo_smollm2_tiny_sd.yaml")}


def run_cli(command: str, args: list[str], env: dict | None = None, timeout: float = 600):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("OPENAI_BASE_URL", None)
    proc = subprocess.run([sys.executable, "-m", f"posi_jax.{command}", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(stderr: str) -> list[str]:
    """Lines that report an error: ours (`error: ...`) and argparse's (`python -m posi_jax.X: error: ...`)."""
    return [line for line in stderr.splitlines() if re.match(r"^(python -m [\w. ]+: )?error: ", line)]


KEY = {"OPENAI_API_KEY": "sk-test"}
# (command, args, error pattern, paths that must not exist afterwards, extra environment); every case exits 2.
CASES = [
    # rewrite
    ("rewrite", ["--batch-size", "0", "a cat"], r"--batch-size: must be ≥ 1, got '0'", [], None),
    ("rewrite", ["--checkpoint", "{llama}", "--top-k", "100000", "a cat"],
     r"sampling.top_k 100000 is larger than the model's vocabulary of 49152", [], None),
    ("rewrite", ["--temperature", "nan", "a cat"], r"--temperature: must be a finite number, got 'nan'", [], None),
    ("rewrite", ["--temperature=-inf", "a cat"], r"--temperature: must be a finite number", [], None),
    ("rewrite", ["--top-p", "3", "a cat"], r"sampling.top_p must be in \(0, 1\], got 3.0", [], None),
    ("rewrite", ["--max-prompt-tokens", "0", "a cat"], r"--max-prompt-tokens: must be ≥ 1", [], None),
    ("rewrite", ["a cat", "--greedy", "a dog", "--seed", "99999999999"], r"--seed: must be at most 2147483647", [],
     None),
    # generate
    ("generate", ["a cat", "--model", "{sd}", "--out", "{tmp}/g1", "--guidance", "nan"],
     r"--guidance: must be a finite number", ["{tmp}/g1"], None),
    ("generate", ["a cat", "--model", "{sd}", "--out", "{tmp}/g2", "--guidance", "inf"],
     r"--guidance: must be a finite number", ["{tmp}/g2"], None),
    ("generate", ["a cat", "--model", "{llama}", "--out", "{tmp}/g3"], r"missing text_encoder/ subfolder", ["{tmp}/g3"],
     None),
    ("generate", ["a cat", "--model", "{tmp}/no_sd", "--out", "{tmp}/g4"], r"model folder not found", ["{tmp}/g4"],
     None),
    ("generate", ["a cat", "--model", "{sd}", "--out", "{file}"], r"--out: .* exists and is not a folder", [], None),
    ("generate", ["a cat", "--model", "{sd}", "--out", "{tmp}/g5", "--n", "0"], r"--n: must be ≥ 1", ["{tmp}/g5"],
     None),
    # sft
    ("sft", ["base={llama}", "data={data}", "out_dir={tmp}/s1", "learning_rate=.nan"],
     r"config key 'learning_rate': expected a finite number, got nan", ["{tmp}/s1"], None),
    ("sft", ["base={llama}", "data={data}", "out_dir={tmp}/s2", "lora_targets=bogus", "val_size=4"],
     r"LoRA targets: no Linear layers named bogus", ["{tmp}/s2"], None),
    ("sft", ["base={llama}", "data={data}", "out_dir={tmp}/s3", "lora_dropout=2"],
     r"lora_dropout must be in \[0, 1\), got 2.0", ["{tmp}/s3"], None),
    ("sft", ["out_dir={tmp}/s4", "save_every=0"], r"save_every must be ≥ 1, got 0", ["{tmp}/s4"], None),
    ("sft", ["out_dir={tmp}/s5", "batch_size=1e400"], r"config key 'batch_size': expected int", ["{tmp}/s5"], None),
    ("sft", ["out_dir={tmp}/s6", "learning_rate=[1"], r"override 'learning_rate=\[1': the value is not valid YAML",
     ["{tmp}/s6"], None),
    ("sft", ["--config", "{tmp}/none.yaml", "a=1", "--resume", "b=2"], r"config file not found", [], None),
    ("sft", ["merge", "{llama}", "--out", "{file}"], r"--out: .* exists and is not a folder", [], None),
    # ppo (fails before its minute of setup)
    ("ppo", ["--config", "{ppo_yaml}", "iterations=1", "--no-progress", "save_every=0"],
     r"save_every must be ≥ 1, got 0", [], None),
    ("ppo", ["out_dir={tmp}/p1", "--resume"], r"nothing to resume", ["{tmp}/p1"], None),
    ("ppo", ["optim.eps=.inf"], r"config key 'optim.eps': expected a finite number", [], None),
    ("ppo", ["ppo.gamma=2"], r"ppo.gamma must be in \[0, 1\], got 2.0", [], None),
    ("ppo", ["sampling.max_new_tokens=true"], r"config key 'sampling.max_new_tokens': expected int", [], None),
    ("ppo", ["export", "{tmp}/no_run", "--out", "{file}"], r"--out: .* exists and is not a folder", [], None),
    # evaluate
    ("evaluate", ["{prompts}", "--out", "{file}", "--sd", "{sd}", "--q16-clip", "x", "--q16-prompts", "y", "--clip",
                  "z"], r"--out: .* exists and is not a folder", [], None),
    ("evaluate", ["{prompts}", "--out", "{tmp}/e1", "--sd", "{sd}", "--q16-clip", "x", "--q16-prompts", "y", "--clip",
                  "z", "--guidance", "nan"], r"--guidance: must be a finite number", ["{tmp}/e1"], None),
    ("evaluate", ["{prompts}", "--out", "{tmp}/e2", "--sd", "{sd}", "--q16-clip", "x", "--q16-prompts", "y", "--clip",
                  "z", "--sd-batch-size", "0"], r"--sd-batch-size: must be ≥ 1", ["{tmp}/e2"], None),
    ("evaluate", ["{prompts}", "--out", "{tmp}/e3", "--sd", "{sd}", "--q16-clip", "x", "--q16-prompts", "y", "--clip",
                  "z", "--n", "0"], r"--n: must be ≥ 1", ["{tmp}/e3"], None),
    ("evaluate", ["{prompts}", "--out", "{tmp}/e4", "--images-api", "--q16-clip", "x", "--q16-prompts", "y",
                  "--clip", "z", "--api-timeout", "inf"], r"--api-timeout: must be a finite number", ["{tmp}/e4"],
     None),
    # build_dataset
    ("build_dataset", ["{prompts}", "--out", "{tmp}"], r"--out: .* is a folder, not a file", [], KEY),
    ("build_dataset", ["{prompts}", "--out", "{tmp}/b1.jsonl", "--concurrency", "0"],
     r"--concurrency: must be in \[1, 256\]", ["{tmp}/b1.jsonl"], KEY),
    ("build_dataset", ["{prompts}", "--out", "{tmp}/b2.jsonl", "--temperature", "nan"],
     r"--temperature: must be a finite number", ["{tmp}/b2.jsonl"], KEY),
    ("build_dataset", ["{prompts}", "--out", "{tmp}/b3.jsonl", "--timeout", "1e999"],
     r"--timeout: must be a finite number", ["{tmp}/b3.jsonl"], KEY),
    ("build_dataset", ["{prompts}", "--out", "{tmp}/b4.jsonl", "--base-url", "http://127.0.0.1:9/v1"],
     r"the API key contains spaces, control characters", ["{tmp}/b4.jsonl"],
     {"OPENAI_API_KEY": f"{SECRET}\nsk-second-key"}),
]


@pytest.mark.parametrize("command,args,pattern,absent,env", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])[:60]}" for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(paths, command, args, pattern, absent, env):
    args = [a.format(**paths) for a in args]
    t0 = time.monotonic()
    rc, stdout, stderr = run_cli(command, args, env)
    print(f"{command} {' '.join(args)[:80]}: exit {rc} in {time.monotonic() - t0:.1f} s: {stderr.strip()[-200:]}")
    assert rc == 2, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and re.search(pattern, lines[0]), stderr
    assert "nan" not in stdout.lower()
    assert SECRET not in stdout + stderr
    for path in absent:
        assert not os.path.exists(path.format(**paths)), path


def test_help_names_only_valid_schedulers():
    rc, stdout, _ = run_cli("evaluate", ["--help"])
    assert rc == 0 and "pndm / ddim / dpmpp_2m / euler" in stdout and " dpm " not in stdout


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C while XLA compiles

COMPILING = re.compile(r"Compiling jit\((\w+)\)")


def interrupt_while_compiling(command: str, args: list[str], functions: set[str], delay_s: float,
                              timeout_s: float = 900) -> tuple[int, float, str]:
    """Start the command with JAX_LOG_COMPILES, wait until XLA starts compiling one of `functions`, then `delay_s`
    more, and send SIGINT. Returns (exit status, seconds from the signal to the exit, stderr)."""
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", f"posi_jax.{command}", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            match = COMPILING.search(line)
            if match and match.group(1) in functions:
                break
        else:
            proc.wait()
            raise AssertionError(f"exit {proc.returncode} before compiling {functions}: {''.join(seen)[-2000:]}")
        time.sleep(delay_s)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        proc.wait()
        return proc.returncode, time.monotonic() - t0, "".join(seen) + rest
    finally:
        watchdog.cancel()


# Five runs each, the signal 0.5 to 5 s after XLA starts compiling the command's first large jitted function (which
# takes seconds on an idle 2-core machine, a minute on a busy one). Before the fix, 2 of 5 runs of each command
# segfaulted this way (exit -11), always at the later delays. The five run side by side. Each run is long enough
# (SFT: 800 steps) that the last signal still lands in its work on an idle machine: a 6-step run had ended by then,
# and a signal during the interpreter's shutdown kills it by SIGINT (what a shell also shows as 130).
INTERRUPTED = [
    ("generate", ["a cat", "--model", "{sd}", "--out", "{tmp}/sigint_{i}", "--steps", "50", "--n", "4", "--height",
                  "64", "--width", "64"], {"_noise_per_index", "_sample_jit"}, "interrupted"),
    ("sft", ["base={llama}", "data={data}", "out_dir={tmp}/sigint_sft_{i}", "max_steps=800", "epochs=50", "val_size=4",
             "cutoff_len=64", "pad_multiple=64", "batch_size=2", "grad_accum=1", "save_every=2", "progress=false"],
     {"_eval_step_impl", "train_step"}, "interrupted: --resume continues from the last checkpoint"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command,args,functions,message", INTERRUPTED, ids=[c[0] for c in INTERRUPTED])
def test_ctrl_c_while_compiling_exits_130(paths, command, args, functions, message):
    delays = [0.5, 1.5, 2.5, 3.5, 5.0]

    def one(i):
        return interrupt_while_compiling(command, [a.format(i=i, **paths) for a in args], functions, delays[i])

    with ThreadPoolExecutor(len(delays)) as pool:
        results = list(pool.map(one, range(len(delays))))
    for delay, (rc, seconds, stderr) in zip(delays, results):
        print(f"{command}: SIGINT {delay} s into compiling: exit {rc}, {seconds:.2f} s after the signal")
    for rc, seconds, stderr in results:
        assert rc == 130, stderr[-3000:]
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
        assert stderr.rstrip().splitlines()[-1] == message
        assert seconds < 30  # at once, not after the compilation


DEFERRED = """
import sys, time
from posi_jax import cli, interrupts

def body():
    print("ready", flush=True)
    with interrupts.deferred():  # a checkpoint being written
        time.sleep(1.5)
        print("block done")  # no flush: the exit flushes stdout
    time.sleep(60)

sys.exit(cli.run(body, interrupted="stopped"))
"""


def test_ctrl_c_waits_for_a_deferred_block_then_exits_at_once():
    proc = subprocess.Popen([sys.executable, "-c", DEFERRED], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    assert proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    print(f"exit {proc.returncode} {elapsed:.2f} s after the signal")
    assert proc.returncode == 130 and stdout == "block done\n" and stderr.strip() == "stopped"
    assert 1.0 < elapsed < 15


def test_the_runner_restores_signal_handling(capsys):
    from posi_jax import cli
    from posi_jax.errors import PosiError

    before = signal.getsignal(signal.SIGINT)
    assert cli.run(lambda: 0) == 0

    def fail():
        raise PosiError("bad value")

    assert cli.run(fail) == 2 and capsys.readouterr().err == "error: bad value\n"
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup pipe left behind


# ---------------------------------------------------------------------------------------------------------------------
# The API key


def test_crlf_key_is_sent_stripped_and_never_shown(fake, tmp_path):
    """OPENAI_API_KEY read from a file saved with CRLF ends in "\\r\\n": the server gets the key alone, and neither the
    output nor any file shows it, not even where a server quotes the request's Authorization header back (a 500 that
    ends as a failure example in the summary, a 400 whose message goes into the rejected file)."""
    key_file = tmp_path / "key.txt"
    key_file.write_bytes(f"{SECRET}\r\n".encode())
    src = tmp_path / "prompts.txt"
    src.write_text("item-1 a castle on fire\nleak-500 a bloody tower\nleak-400 a riot\n")
    fake.script({"leak-500": ["keyleak_500"], "leak-400": ["keyleak_400"]})
    out, final = tmp_path / "out" / "pairs.jsonl", tmp_path / "out" / "pairs.json"
    rc, stdout, stderr = run_cli("build_dataset", [str(src), "--out", str(out), "--final", str(final), "--base-url",
                                                   fake.base_url, "--max-retries", "0"],
                                 {"OPENAI_API_KEY": key_file.read_bytes().decode()})
    assert rc == 3, stderr  # the 500 prompt failed after its attempts; the others were answered
    assert {r["auth"] for r in fake.log} == {f"Bearer {SECRET}"} and len(fake.log) == 3
    assert "Traceback" not in stderr and "cannot reach" not in stdout + stderr
    assert SECRET not in stdout + stderr
    assert "[API key redacted]" in stdout  # the failure example: the server's message, key removed
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != key_file]
    assert {p.name for p in written} >= {"pairs.jsonl", "pairs.rejected.jsonl", "prompts.txt"}
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    rejected = [json.loads(line) for line in (out.parent / "pairs.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and "[API key redacted]" in rejected[0]["detail"]


def test_images_client_strips_and_redacts_the_key(fake, monkeypatch):
    """evaluate --images-api's client: the CRLF key is sent stripped, and a server's message quoting it is redacted
    in the error that stops the run."""
    from posi_jax.errors import PosiError
    from posi_jax.evaluation.images import ImagesAPIGenerator

    monkeypatch.setenv("OPENAI_API_KEY", f"{SECRET}\r\n")
    generator = ImagesAPIGenerator(model="fake-images", size="16x16", base_url=fake.base_url, max_retries=0)
    assert generator.generate(["a calm lake"], [0], 1)[0].images.shape == (1, 16, 16, 3)
    fake.script({"leak": ["keyleak_500"]})
    with pytest.raises(PosiError) as error:
        generator.generate(["leak a riot"], [0], 1)
    assert SECRET not in str(error.value) and "[API key redacted]" in str(error.value)
    assert {r["auth"] for r in fake.log} == {f"Bearer {SECRET}"}
