"""`python -m posi_jax.generate` end to end on the tiny random SD folder (subprocess): PNG files of the right size,
the grid, and bad input giving one `error:` line with exit code 2."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import REPO


def run_cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "posi_jax.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_writes_pngs_and_grid(tiny_sd_folder, tmp_path):
    # the folder as the installed diffusers saves it: tokenizer/tokenizer.json, no vocab.json / merges.txt
    assert not (tiny_sd_folder / "tokenizer" / "vocab.json").exists()
    out = tmp_path / "images"
    rc, stdout, err = run_cli("a photo of a cat", "a red car", "--model", str(tiny_sd_folder), "--out", str(out),
                              "--steps", "2", "--n", "2", "--height", "24", "--width", "16", "--seed", "3",
                              "--scheduler", "euler", "--negative", "blurry")
    assert rc == 0, err
    names = ["p00_00.png", "p00_01.png", "p01_00.png", "p01_01.png", "grid.png"]
    assert stdout.split() == [str(out / n) for n in names]
    pixels = []
    for name in names[:4]:
        im = Image.open(out / name)
        assert im.size == (16, 24) and im.mode == "RGB"
        pixels.append(np.asarray(im))
    assert len({p.tobytes() for p in pixels}) == 4  # every image differs (own noise, own prompt)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (48, 32, 3)  # a row per prompt, a column per image
    np.testing.assert_array_equal(grid[24:48, 16:32], pixels[3])


def test_missing_model_folder(tmp_path):
    rc, stdout, err = run_cli("a cat", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 2 and stdout == ""
    assert "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {tmp_path / 'nope'}: model folder not found"]


def test_bad_size_is_one_line_error(tiny_sd_folder, tmp_path):
    rc, _, err = run_cli("a cat", "--model", str(tiny_sd_folder), "--out", str(tmp_path / "o"), "--height", "20")
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: height=20: must be a positive multiple of 8"
