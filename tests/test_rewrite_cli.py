"""`python -m posi_jax.rewrite` end to end in a subprocess: outputs, JSON, stdin/file input, and bad input giving a
one-line error with a non-zero exit code (never a traceback)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_cli(*args, stdin: bytes | None = None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "posi_jax.rewrite", *args], cwd=REPO, input=stdin,
                          capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def assert_one_line_error(rc, err, pattern):
    assert rc != 0
    assert "Traceback" not in err, err
    # ours: "error: ..."; argparse's (a flag's type refused the value): "prog: error: ..." after its usage lines
    lines = [l for l in err.strip().splitlines() if l.startswith("error:") or ": error: " in l]
    assert len(lines) == 1 and pattern in lines[0], err


def test_json_output_from_file_with_tiny_model(tmp_path, tiny_llama_folder):
    f = tmp_path / "prompts.txt"
    f.write_text("a photo of a cat\nA violent street fight, blood everywhere\n", encoding="utf-8")
    rc, out, err = run_cli("--checkpoint", str(tiny_llama_folder), "--file", str(f), "--json", "--greedy",
                           "--max-new-tokens", "8")
    assert rc == 0, err
    rows = [json.loads(l) for l in out.splitlines()]
    assert [r["original"] for r in rows] == ["a photo of a cat", "A violent street fight, blood everywhere"]
    assert all(isinstance(r["rewritten"], str) and 0 < r["new_tokens"] <= 8 and r["seconds"] > 0 for r in rows)
    # prompt lookup is on by default: steps and draft counts per prompt; off, the same greedy text in one step a token
    assert all(0 < r["steps"] <= r["new_tokens"] and 0 <= r["draft_accepted"] <= r["draft_tokens"] for r in rows)
    assert all(r["acceptance_rate"] == (round(r["draft_accepted"] / r["draft_tokens"], 4) if r["draft_tokens"]
                                        else None) for r in rows)
    rc, out, err = run_cli("--checkpoint", str(tiny_llama_folder), "--file", str(f), "--json", "--greedy",
                           "--max-new-tokens", "8", "--no-prompt-lookup")
    assert rc == 0, err
    plain = [json.loads(l) for l in out.splitlines()]
    assert [r["rewritten"] for r in plain] == [r["rewritten"] for r in rows]
    assert all(r["draft_tokens"] == 0 and r["acceptance_rate"] is None and r["steps"] == r["new_tokens"]
               for r in plain)


def test_stdin_and_over_long_prompt_warns(tiny_llama_folder):
    long_prompt = ("a very long prompt " * 200).encode()
    rc, out, err = run_cli("--checkpoint", str(tiny_llama_folder), "--greedy", "--max-new-tokens", "4",
                           "--max-prompt-tokens", "64", stdin=long_prompt + b"\nshort one\n")
    assert rc == 0, err
    assert "warning: prompt of" in err and "truncated to 64" in err
    assert len(out.splitlines()) == 2


@pytest.mark.parametrize("args,stdin,pattern", [
    (["", "--checkpoint", "X"], None, "empty prompt"),
    (["   \t "], None, "empty prompt"),
    ([], b"a cat\n\xff\xfe broken\n", "stdin is not valid UTF-8"),
    ([], b"first\n\nthird\n", "line 2 is empty"),
    (["a cat", "--checkpoint", "/nonexistent/model.gguf"], None, "checkpoint not found"),
    (["a cat", "--temperature", "0"], None, "temperature"),
    (["a cat", "--prompt-lookup-tokens", "-1"], None, "--prompt-lookup-tokens: must be ≥ 0"),
    (["a cat", "--prompt-lookup-tokens", "3", "--no-prompt-lookup"], None, "not both"),
])
def test_bad_input_one_line_error(args, stdin, pattern):
    rc, _, err = run_cli(*args, stdin=stdin if stdin is not None else b"")
    assert_one_line_error(rc, err, pattern)


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    rc, _, err = run_cli("a cat", "--checkpoint", str(bad))
    assert_one_line_error(rc, err, "not a readable GGUF")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    rc, _, err = run_cli("a cat", "--checkpoint", str(folder))
    assert_one_line_error(rc, err, "not valid JSON")


def test_library_api(tiny_llama_folder):
    from posi_jax import Rewriter
    from posi_jax.errors import PosiError
    from posi_jax.policy.sampler import SamplingConfig

    rw = Rewriter.load(str(tiny_llama_folder))
    out = rw.rewrite(["a cat", "a dog"], SamplingConfig(max_new_tokens=4, greedy=True))
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    with pytest.raises(PosiError, match="prompt 2: empty"):
        rw.rewrite(["ok", " "])
