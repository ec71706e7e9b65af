"""training/distributed.initialize: when it joins a multi-host run and with which arguments (jax.distributed replaced
by a recorder; the real joins run in tests/training/test_multihost.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import pytest

from posi_jax.errors import PosiError
from posi_jax.training import distributed
from tests.conftest import REPO

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "POSI_JAX_HEARTBEAT_TIMEOUT_S")


@pytest.fixture
def calls(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


def test_not_requested_does_nothing(calls):
    distributed.initialize(False)
    assert calls == []


def test_config_flag_lets_jax_discover_the_cluster(calls):
    distributed.initialize(True)  # a TPU VM: jax.distributed finds its peers
    assert calls == [{"heartbeat_timeout_seconds": distributed.HEARTBEAT_TIMEOUT_S}]


def test_environment_names_the_peers(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("POSI_JAX_HEARTBEAT_TIMEOUT_S", "7")
    distributed.initialize(False)  # the launcher's environment alone is enough
    assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
                      "heartbeat_timeout_seconds": 7}]


def test_incomplete_environment_is_an_error(calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(PosiError, match="JAX_PROCESS_ID"):
        distributed.initialize(False)
    assert calls == []


LAUNCHER = ["bash", str(REPO / "scripts" / "multihost_local.sh")]


def test_launcher_environment_of_each_process():
    out = subprocess.run([*LAUNCHER, "3", "bash", "-c", 'echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES $JAX_PLATFORMS '
                          '$JAX_CPU_COLLECTIVES_IMPLEMENTATION $JAX_COORDINATOR_ADDRESS $XLA_FLAGS"'],
                         capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"], "PYTHON": sys.executable,
                              "DEVICES_PER_PROCESS": "2"})
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.splitlines())
    assert [line.split()[:4] for line in lines] == [[f"[{i}]", f"{i}/3", "cpu", "gloo"] for i in range(3)]
    assert len({line.split()[4] for line in lines}) == 1 and lines[0].split()[4].startswith("127.0.0.1:")
    assert all("--xla_force_host_platform_device_count=2" in line for line in lines)


def test_launcher_stops_the_others_when_one_fails():
    t0 = time.monotonic()
    out = subprocess.run([*LAUNCHER, "2", "bash", "-c", 'if [ "$JAX_PROCESS_ID" = 1 ]; then exit 3; fi; exec sleep 60'],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and time.monotonic() - t0 < 30, (out.returncode, out.stderr)
    assert "exited with status 3; stopping the others" in out.stderr
