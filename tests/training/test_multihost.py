"""The multi-host code path on one machine (scripts/multihost_local.sh: CPU processes joined by jax.distributed over
loopback, gloo collectives): 2 processes x 4 devices give the same SFT and PPO numbers as 1 process x 8 devices, write
one metrics file, resume identically, and a killed peer makes the survivor fail instead of hanging.

Slow: seven launches of fresh processes, each compiling its programs (no shared compilation cache across
multi-process launches, see `launch`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from posi_jax.training.metrics import read_metrics
from tests.conftest import REPO

pytestmark = pytest.mark.slow

LAUNCHER = REPO / "scripts" / "multihost_local.sh"
TOL = 1e-5
TIMING = ("time/", "tokens_per_s", "step_s")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache"))}


def launch(env, processes: int, devices: int, *argv: str) -> str:
    """Run `python ARGV` in `processes` joined processes of `devices` CPU devices each; its output (must succeed).
    One-process launches share a persistent compilation cache (the PPO run and its resumption compile the same
    programs); multi-process launches do not use it: with jax 0.10.2 a second 2-process run reading the cache
    aborted."""
    env = dict(env, DEVICES_PER_PROCESS=str(devices))
    if processes > 1:
        env.pop("JAX_COMPILATION_CACHE_DIR")
    else:
        env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    run = subprocess.run(["bash", str(LAUNCHER), str(processes), sys.executable, *argv], cwd=REPO, text=True,
                         env=env, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMING) and k != "samples"} for row in rows]


def assert_rows_close(a: list[dict], b: list[dict]) -> None:
    a, b = numbers(a), numbers(b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if isinstance(ra[k], (int, float)):
                assert abs(ra[k] - rb[k]) <= TOL * max(1.0, abs(rb[k])), (k, ra, rb)
            else:
                assert ra[k] == rb[k], k


def checkpoint_arrays(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint (params, optimizer state, scalars), flattened, read back on this one device."""
    import jax
    import orbax.checkpoint as ocp

    out = {}
    folder = run_dir / "checkpoints" / str(step)
    for item in sorted(p.name for p in folder.iterdir() if (p / "_METADATA").is_file() or (p / "_sharding").exists()):
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(folder / item)
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
            restored = ckptr.restore(folder / item, abstract)
        for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
            out[f"{item}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    assert out, f"no arrays in {folder}"
    return out


def assert_arrays_close(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k].astype(np.float64), b[k].astype(np.float64), rtol=TOL, atol=TOL, err_msg=k)


def assert_one_writer(run_dir: Path) -> None:
    """Process 0 alone wrote metrics: one TensorBoard file, no row twice."""
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    rows = read_metrics(run_dir)
    keys = [json.dumps({k: r[k] for k in r if k in ("step", "iteration", "val_loss")}) for r in rows]
    assert len(keys) == len(set(keys)), keys


# ---- SFT: 6 steps ----------------------------------------------------------------------------------------------------
def sft_args(base, pairs) -> list[str]:
    return ["-m", "posi_jax.sft", f"base={base}", f"data={pairs}", "batch_size=8", "grad_accum=1", "max_steps=6",
            "cutoff_len=128", "pad_multiple=128", "val_size=8", "learning_rate=1e-2", "save_every=1",
            "keep_checkpoints=3", "progress=false"]


@pytest.fixture(scope="module")
def sft_pairs(data_dir, tmp_path_factory) -> Path:
    pairs = tmp_path_factory.mktemp("sft_data") / "pairs.json"
    pairs.write_text(json.dumps(json.loads((data_dir / "sft_toxic_clean.json").read_text())[:40]))
    return pairs


@pytest.fixture(scope="module")
def sft_runs(env, tiny_llama_folder, sft_pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    args = sft_args(tiny_llama_folder, sft_pairs)
    runs = {}
    for name, procs, devices in (("two", 2, 4), ("one", 1, 8)):
        runs[name] = root / name
        launch(env, procs, devices, *args, f"out_dir={runs[name]}")
    return runs


def test_sft_two_processes_equal_one(sft_runs):
    two, one = sft_runs["two"], sft_runs["one"]
    rows = read_metrics(two)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert_rows_close(rows, read_metrics(one))
    assert_arrays_close(checkpoint_arrays(two, 6), checkpoint_arrays(one, 6))
    from safetensors.numpy import load_file

    assert_arrays_close(load_file(two / "adapter" / "adapter.safetensors"),
                        load_file(one / "adapter" / "adapter.safetensors"))
    assert_one_writer(two)


def test_killed_process_fails_the_other_then_resume_continues_identically(env, tiny_llama_folder, sft_pairs,
                                                                         sft_runs, tmp_path):
    """SIGKILL one of two processes after checkpoint 2: the other exits non-zero within 60 s (the coordination
    service misses the dead one's heartbeat), only complete checkpoints are left, and --resume in 2 processes
    finishes the run exactly as the uninterrupted 2-process run."""
    from posi_jax.training import checkpointing

    out = tmp_path / "run"
    args = [sys.executable, *sft_args(tiny_llama_folder, sft_pairs), f"out_dir={out}"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={
        **base_env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
        "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while checkpointing.latest_step(out) is None or checkpointing.latest_step(out) < 2:
            assert procs[0].poll() is None and time.monotonic() < deadline, "no checkpoint 2"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status = procs[0].wait(timeout=90)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert status != 0 and waited < 60, (status, waited)
    steps = checkpointing.all_steps(out)
    assert steps and max(steps) < 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(map(str, steps))  # no partial step
    for step in steps:
        assert (out / "checkpoints" / str(step) / "commit_success.txt").is_file()
    launch(env, 2, 4, *args[1:], "--resume")
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert_rows_close(read_metrics(out), read_metrics(sft_runs["two"]))
    assert_arrays_close(checkpoint_arrays(out, 6), checkpoint_arrays(sft_runs["two"], 6))


# ---- PPO: 2 iterations, tiny random policy and image reward ----------------------------------------------------------
PPO_CONFIG = """
prompts: {prompts}
max_prompts: 16
max_prompt_tokens: 32
sampling: {{max_new_tokens: 8}}
ppo: {{batch_size: 8, mini_batch_size: 8, gradient_accumulation_steps: 1, ppo_epochs: 1}}
optim: {{learning_rate: 1.0e-3}}
reward:
  kind: tiny_random
  q16_prompts: {q16}
  config: {{images_per_prompt: 1, steps: 2, seed_policy: per_prompt}}
iterations: 2
save_every: 1
"""


@pytest.fixture(scope="module")
def ppo_runs(env, tiny_llama_folder, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    config = root / "ppo.yaml"
    config.write_text(PPO_CONFIG.format(prompts=data_dir / "ppo_prompts.json", q16=data_dir / "q16_prompts.p"))
    args = ["-m", "posi_jax.ppo", "--config", str(config), f"policy.checkpoint={tiny_llama_folder}"]
    runs = {}
    for name, procs, devices in (("two", 2, 4), ("one", 1, 8)):
        runs[name] = root / name
        launch(env, procs, devices, *args, f"out_dir={runs[name]}", "--no-progress")
    # the 2-process run's checkpoint 1 resumed by ONE process of 8 devices: orbax reshards onto the new mesh
    runs["resumed"] = root / "resumed"
    shutil.copytree(runs["two"], runs["resumed"])
    shutil.rmtree(runs["resumed"] / "checkpoints" / "2")
    launch(env, 1, 8, *args, f"out_dir={runs['resumed']}", "--no-progress", "--resume")
    return runs


def test_ppo_two_processes_equal_one(ppo_runs):
    two, one = ppo_runs["two"], ppo_runs["one"]
    rows = read_metrics(two)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert_rows_close(rows, read_metrics(one))
    assert [r["samples"] for r in rows] == [r["samples"] for r in read_metrics(one)]
    assert_arrays_close(checkpoint_arrays(two, 2), checkpoint_arrays(one, 2))
    assert_one_writer(two)


def test_ppo_two_process_checkpoint_resumes_in_one_process(ppo_runs):
    two, resumed = ppo_runs["two"], ppo_runs["resumed"]
    assert_rows_close(read_metrics(resumed), read_metrics(two))
    assert_arrays_close(checkpoint_arrays(resumed, 2), checkpoint_arrays(two, 2))
