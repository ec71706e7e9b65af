"""Joining a multi-host run (`jax.distributed`) and the process-0 rule for side effects.

On a Cloud TPU VM, `jax.distributed.initialize()` finds its peers by itself. Elsewhere (`scripts/multihost_local.sh`:
several CPU processes on one machine, the pod's code path without a pod) the peers are named in the environment:
JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. A run joins when its config
says `distributed: true` or when those variables are set, so a launcher never starts N independent copies of a run
writing into one folder. POSI_JAX_HEARTBEAT_TIMEOUT_S overrides how soon a dead peer fails the others.
"""
from __future__ import annotations

import os

import jax

from posi_jax.errors import PosiError

# A dead peer is noticed by the coordination service after this many seconds without its heartbeat; every other
# process then fails instead of waiting in a collective forever (JAX's default is 100 s).
HEARTBEAT_TIMEOUT_S = 20


def requested_by_environment() -> bool:
    return "JAX_NUM_PROCESSES" in os.environ


def initialize(requested: bool) -> None:
    """Join the multi-host run if `requested` or the environment names one; idempotent; must run before any JAX
    computation."""
    if not (requested or requested_by_environment()) or jax.distributed.is_initialized():
        return
    kwargs = {}
    if requested_by_environment():
        try:
            kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
                      "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                      "process_id": int(os.environ["JAX_PROCESS_ID"])}
        except (KeyError, ValueError) as e:
            raise PosiError(f"multi-host environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                            f"must all be set, the last two as integers ({type(e).__name__}: {e})") from None
    heartbeat = int(os.environ.get("POSI_JAX_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S))
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat, **kwargs)


def is_main_process() -> bool:
    """Process 0 alone writes metrics, summaries and exports and shows progress bars."""
    return jax.process_index() == 0
