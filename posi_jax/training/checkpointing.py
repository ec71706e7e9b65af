"""Orbax checkpoints of any training state (SFT, PPO): named pytrees + a JSON dict, one folder per step.

    from posi_jax.training import checkpointing
    checkpointing.save(run_dir, step, {"params": params, "opt_state": opt_state}, extra={"micro_step": 12}, keep=3)
    step = checkpointing.latest_step(run_dir)                   # None when there is no checkpoint
    items, extra = checkpointing.restore(run_dir, step, {"params": abstract_params})  # restore only what you name

`items` maps names to pytrees of arrays (nnx.State, optax states, dicts; PRNG keys as `jax.random.key_data`).
`abstract` gives each restored item's structure, shapes and dtypes (`jax.eval_shape` or the live values); items not
named are left on disk. `extra` is plain JSON (counters, config, data-order seed): everything a resume needs that is
not an array. `keep` keeps the newest N steps. Layout: `run_dir/checkpoints/<step>/{<item>/, extra/}`.
"""
from __future__ import annotations

from pathlib import Path

import jax

from posi_jax import interrupts
from posi_jax.errors import PosiError

_EXTRA = "extra"


def _manager(run_dir, keep: int | None = None, *, create: bool = True):
    import orbax.checkpoint as ocp

    directory = Path(run_dir).expanduser().absolute() / "checkpoints"
    if not create and not directory.is_dir():
        return None
    # A step is written into a temporary folder and renamed when every process has finished it, so a crash leaves no
    # partial step; cleanup_tmp_directories removes such leftovers when the run resumes.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=create)
    return ocp.CheckpointManager(directory, options=options)


def save(run_dir, step: int, items: dict, extra: dict | None = None, *, keep: int | None = None) -> Path:
    """Write `items` and `extra` as checkpoint `step` (overwriting nothing: a step saved twice is an error)."""
    import orbax.checkpoint as ocp

    if _EXTRA in items:
        raise ValueError(f"item name {_EXTRA!r} is reserved for the JSON dict")
    mgr = _manager(run_dir, keep)
    if step in mgr.all_steps():
        raise PosiError(f"{run_dir}: checkpoint for step {step} already exists")
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    args[_EXTRA] = ocp.args.JsonSave(dict(extra or {}))
    with interrupts.deferred():  # a Ctrl-C meanwhile exits once the checkpoint is complete
        mgr.save(step, args=ocp.args.Composite(**args))
        mgr.wait_until_finished()
    mgr.close()
    return Path(run_dir) / "checkpoints" / str(step)


def all_steps(run_dir) -> list[int]:
    mgr = _manager(run_dir, create=False)
    if mgr is None:
        return []
    steps = sorted(mgr.all_steps())
    mgr.close()
    return steps


def latest_step(run_dir) -> int | None:
    steps = all_steps(run_dir)
    return steps[-1] if steps else None


def restore(run_dir, step: int | None, abstract: dict) -> tuple[dict, dict]:
    """(items named in `abstract`, extra) of checkpoint `step` (None: the latest)."""
    import orbax.checkpoint as ocp

    mgr = _manager(run_dir, create=False)
    steps = [] if mgr is None else sorted(mgr.all_steps())
    if not steps:
        raise PosiError(f"{run_dir}: no checkpoints to restore")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PosiError(f"{run_dir}: no checkpoint for step {step} (have {', '.join(map(str, steps))})")
    args = {name: ocp.args.StandardRestore(jax.tree.map(_as_abstract, tree)) for name, tree in abstract.items()}
    args[_EXTRA] = ocp.args.JsonRestore()
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise PosiError(f"{run_dir}: checkpoint {step} does not match the expected state "
                        f"({str(e).splitlines()[0][:200]})") from None
    finally:
        mgr.close()
    return {name: out[name] for name in abstract}, dict(out[_EXTRA] or {})


def _as_abstract(x):
    return x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype)
