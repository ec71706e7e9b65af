"""Read torch checkpoints (`torch.save` zip files: .bin/.pt/.pth, and TorchScript archives such as OpenAI CLIP's .pt)
with numpy only: no torch at run time.

Both are zip archives holding `<root>/data.pkl` and one raw little-endian file per storage (`<root>/data/<key>`).
The pickle is read with an unpickler that knows only the few globals a state dict needs (tensor rebuild, storage
types, OrderedDict) and refuses every other one, so loading a checkpoint cannot run code. TorchScript archives
pickle the module tree (`__torch__.*` objects whose state is a dict of attributes): those become plain records and
their tensors are collected under dotted attribute paths, as `module.state_dict()` names them.
"""
from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict

import numpy as np

from posi_jax.errors import PosiError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,  # raw bits; widened to float32 below
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, array: np.ndarray, bfloat16: bool):
        self.array, self.bfloat16 = array, bfloat16


class _ScriptObject:
    """A TorchScript module/object: only its attribute dict is kept."""

    def __init__(self, *args):
        self.attrs: dict = {}

    def __setstate__(self, state):
        self.attrs = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored) -> np.ndarray:
    a = storage.array
    if len(size) == 0:
        out = a[offset:offset + 1].reshape(())
    else:
        itemsize = a.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(a[offset:], shape=tuple(size),
                                              strides=tuple(s * itemsize for s in stride))
    out = np.array(out)  # own, contiguous copy
    if storage.bfloat16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, source: str):
        super().__init__(file)
        self.archive, self.root, self.source = archive, root, source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module.startswith("__torch__"):
            return _ScriptObject
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage type {storage_type!r} is not supported")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.root}/data/{key}")
            except KeyError:
                raise PosiError(f"{self.source}: storage {key} is missing from the archive") from None
            array = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
            self.storages[key] = _Storage(array, storage_type.name == "BFloat16Storage")
        return self.storages[key]


def _collect(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, _ScriptObject):
        _collect(obj.attrs, prefix, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                _collect(v, f"{prefix}.{k}" if prefix else k, out)


def load_torch_pickle(path: str):
    """The object a torch zip file holds, with tensors as numpy arrays (TorchScript modules as `_ScriptObject`)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PosiError(f"{path}: not a torch zip checkpoint ({e}); the legacy pre-1.6 torch format is not "
                        f"supported: re-save it with a recent torch or convert it to .safetensors") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise PosiError(f"{path}: zip archive without a single <root>/data.pkl: not a torch checkpoint")
        root = pickles[0].split("/")[0]
        byteorder = f"{root}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise PosiError(f"{path}: big-endian torch checkpoints are not supported")
        try:
            with archive.open(pickles[0]) as f:
                return _Unpickler(f, archive, root, path).load()
        except PosiError:
            raise
        except Exception as e:  # corrupt pickle, refused global, truncated storage
            raise PosiError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {e})") from None


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """{name: array} from a torch.save zip file or a TorchScript archive. fp16/bf16 become float32."""
    obj = load_torch_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # trainer checkpoints nest the weights
        obj = obj["state_dict"]
    if not isinstance(obj, (dict, _ScriptObject)):
        raise PosiError(f"{path}: torch checkpoint holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    _collect(obj, "", out)
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in out.items()}
