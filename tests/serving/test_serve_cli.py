"""`python -m posi_jax.serve` as users run it: bad settings print one `error:` line and exit 2 before anything loads;
a real run prints its URL once it accepts connections, forwards keys as documented without ever logging one, logs
prompts at debug level, and on SIGTERM finishes the request in flight, then exits 0."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER_KEY = "sk-server-cli-secret-4242"
CALLER_KEY = "sk-caller-cli-secret-2424"


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("OPENAI_API_KEY", None)
    return {**env, **extra}


def _run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posi_jax.serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=REPO)


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "4,1"], "error: batch sizes must be increasing integers >= 1, got 4,1"),
    (["--batch-sizes", "1,x"], "error: --batch-sizes '1,x': expected comma-separated integers"),
    (["--sampling-variant", "colour=red"], "error: --sampling-variant 'colour=red': unknown config key(s) colour"),
    (["--sd", "/nonexistent/sd"], "error: --sd /nonexistent/sd: Stable Diffusion folder not found"),
    (["--upstream", "ftp://example.com/v1"], "error: base URL must start with http:// or https://"),
])
def test_bad_settings_print_one_error_line(args, message):
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_a_taken_port_is_one_error_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = _run("--port", str(port))
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"error: cannot listen on 127.0.0.1:{port}: the port is already in use")


@pytest.mark.slow
def test_a_real_run_serves_forwards_keys_logs_no_key_and_drains_on_sigterm(tiny_llama_folder, fake_images, tmp_path):
    import httpx2

    fake_images.script({})
    fake_images.log.clear()
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posi_jax.serve", "--checkpoint", str(tiny_llama_folder), "--port", "0",
             "--upstream", fake_images.base_url, "--batch-sizes", "1,4", "--max-prompt-tokens", "16",
             "--max-new-tokens", "8", "--greedy", "--log-level", "debug"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=_env(OPENAI_API_KEY=SERVER_KEY), cwd=REPO)
    try:
        line = _read_line(proc, timeout_s=600)
        assert line.startswith("serving on http://127.0.0.1:"), (line, err_path.read_text()[-2000:])
        url = line.split()[-1]
        with httpx2.Client(base_url=url, timeout=60) as c:
            rewrite = c.post("/v1/rewrite", json={"prompts": ["an unmistakable walrus prompt"]})
            theirs = c.post("/v1/images/generations", headers={"authorization": f"Bearer {CALLER_KEY}"},
                            json={"prompt": "a cat"})
            ours = c.post("/v1/images/generations", json={"prompt": "a dog"})
            health = c.get("/healthz").json()
            fake_images.delay_s = 1.5
            try:
                box = {}
                t = threading.Thread(target=lambda: box.update(r=c.post("/v1/images/generations",
                                                                        json={"prompt": "a bird"})))
                t.start()
                deadline = time.monotonic() + 30
                while fake_images.in_flight == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                t.join(60)
            finally:
                fake_images.delay_s = 0.0
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err_path.read_text()
    assert rewrite.status_code == theirs.status_code == ours.status_code == 200
    assert [r["auth"] for r in fake_images.log[:2]] == [f"Bearer {CALLER_KEY}", f"Bearer {SERVER_KEY}"]
    assert health["compilations_after_warmup"] == 0
    assert box["r"].status_code == 200, "the request in flight at SIGTERM was not drained"
    assert rc == 0, stderr[-2000:]
    assert "POST /v1/images/generations 200" in stderr and "walrus" in stderr  # debug level logs prompts
    assert SERVER_KEY not in stderr and CALLER_KEY not in stderr


def _read_line(proc, timeout_s: float) -> str:
    box = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0].strip() if box else ""
