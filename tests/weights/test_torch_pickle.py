"""Reading torch checkpoints without torch: every dtype, views with odd strides, TorchScript archives, and refusals."""
import pickle
import zipfile

import numpy as np
import pytest
import torch

from posi_jax.errors import PosiError
from posi_jax.weights.safetensors_io import read_tensor_file
from posi_jax.weights.torch_pickle import read_torch_file


def test_state_dict_dtypes_and_views(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    sd = {
        "f32": torch.randn(3, 4), "transposed": base.t(), "sliced": base[1:4, ::2], "scalar": torch.tensor(2.5),
        "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(), "f64": torch.randn(2).double(),
        "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "param": torch.nn.Parameter(torch.ones(2)),
    }
    path = tmp_path / "sd.bin"
    torch.save(sd, path)
    got = read_tensor_file(path)
    assert set(got) == set(sd)
    for k, v in sd.items():
        want = v.detach().float().numpy() if v.dtype in (torch.float16, torch.bfloat16) else v.detach().numpy()
        assert got[k].shape == tuple(v.shape) and got[k].dtype == want.dtype, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def test_nested_state_dict_and_torchscript(tmp_path):
    lin = torch.nn.Linear(3, 2)
    torch.save({"state_dict": lin.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    got = read_torch_file(str(tmp_path / "ckpt.pt"))
    np.testing.assert_array_equal(got["weight"], lin.weight.detach().numpy())

    seq = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.jit.trace(seq, torch.zeros(1, 3)).save(str(tmp_path / "jit.pt"))
    got = read_torch_file(str(tmp_path / "jit.pt"))
    want = {k: v.detach().numpy() for k, v in seq.state_dict().items()}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_refusals(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x80\x02not a zip")
    with pytest.raises(PosiError, match="not a torch zip checkpoint"):
        read_torch_file(str(garbage))

    evil = tmp_path / "evil.bin"  # a pickle that would call os.system: refused, never run
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(PosiError, match=r"global os\.system is not allowed"):
        read_torch_file(str(evil))

    not_dict = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(PosiError, match="holds a list, not a state dict"):
        read_torch_file(str(not_dict))

    with pytest.raises(PosiError, match="no such checkpoint file"):
        read_tensor_file(tmp_path / "missing.bin")
