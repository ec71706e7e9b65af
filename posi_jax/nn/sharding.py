"""Device mesh with `data` and `fsdp` axes, and the partition specs of parameters and batches.

- Parameters (and anything shaped like them: optimizer moments) are FSDP-sharded: the largest axis divisible by the
  `fsdp` size is split over `fsdp`, and every array is replicated over `data`. Arrays with no such axis (norm scales,
  scalars, small LoRA factors) are replicated.
- Batches are split on their leading axis over both axes (`("data", "fsdp")`), so every device holds distinct rows:
  FSDP gathers the weights and keeps the batch split, plain data parallelism (fsdp = 1) replicates the weights.
Works across hosts: parameters are assembled with `jax.make_array_from_callback` from the (identical) host copies,
batches with `jax.make_array_from_process_local_data` from the rows each host's devices hold (`put_batch`).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from posi_jax.errors import PosiError

DATA_AXIS = "data"
MESH_AXES = (DATA_AXIS, "fsdp")
BATCH_AXES = (DATA_AXIS, "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A [data, fsdp] mesh over `devices` (default: all); `data=-1` takes every device `fsdp` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or (data != -1 and data < 1):
        raise PosiError(f"mesh: data={data} and fsdp={fsdp} must be ≥ 1 (data may be -1: all remaining devices)")
    if data == -1:
        if len(devices) % fsdp:
            raise PosiError(f"mesh: fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise PosiError(f"mesh: data={data} x fsdp={fsdp} needs {data * fsdp} devices, there are {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), MESH_AXES)


def data_mesh(devices=None) -> Mesh | None:
    """A 1-D mesh with the axis "data" over `devices` (default: all) for data-parallel image work (weights replicated,
    images split); None when there is only one device (nothing to split)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,)) if len(devices) > 1 else None


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
    """Split the largest axis divisible by `fsdp_size` over `fsdp`; replicate when none is (or fsdp_size is 1)."""
    if fsdp_size == 1:
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def param_shardings(tree, mesh: Mesh):
    """A NamedSharding per array leaf of `tree` (arrays or ShapeDtypeStructs), FSDP rule above."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Rows split over every device; `leading_axes` unsplit axes first (e.g. [minibatch, accumulation, rows, ...])."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), BATCH_AXES))


def check_batch(rows: int, mesh: Mesh, what: str) -> None:
    if rows % mesh.size:
        raise PosiError(f"{what} of {rows} rows does not split over the {mesh.size} devices of the mesh "
                        f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); make it a multiple of {mesh.size}")


def put(tree, shardings):
    """Place host or device arrays with the given shardings (one, or a tree of them). Multi-host safe: every host
    holds the same values, and each writes only its own devices' parts (`jax.device_put` would first check across
    hosts that the values agree: one collective per array). PRNG key arrays and arrays already spread over several
    hosts are handled too."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: a resharding
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def process_rows(rows: int, sharding: NamedSharding) -> slice:
    """The rows of a [rows, ...] batch split by `sharding` that this process's devices hold (one contiguous block,
    as the mesh lists each host's devices together)."""
    index = sharding.addressable_devices_indices_map((rows,))
    starts = [idx[0].indices(rows)[0] for idx in index.values()]
    stops = [idx[0].indices(rows)[1] for idx in index.values()]
    block = slice(min(starts), max(stops))
    if sum(b - a for a, b in set(zip(starts, stops))) != block.stop - block.start:
        raise PosiError(f"this process's devices hold non-contiguous rows of a {rows}-row batch")
    return block


def put_batch(arrays, sharding: NamedSharding):
    """A global batch (rows split over every device by `sharding`) from host arrays: each process hands over only
    the rows its own devices hold (`process_rows`, through `jax.make_array_from_process_local_data`)."""
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)

    def one(x):
        host = np.asarray(x)
        block = process_rows(host.shape[0], sharding)
        return jax.make_array_from_process_local_data(sharding, host[block], host.shape)

    return jax.tree.map(one, arrays)


def to_host(x) -> np.ndarray:
    """A global array as a numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
