"""The one resolver of POSI data files (`posi:NAME`): an explicit path, $POSI_DATA, the checkout's ../shared/data/posi,
the user cache filled from the pinned upstream release (served here by a loopback HTTP server: no network needed) with
its SHA-256 check, a wrong checksum, and offline-and-not-cached as one `error:` line and exit status 2 from a command.
No test touches the real ~/.cache: each gets its own cache folder through POSI_JAX_CACHE."""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from posi_jax.data import posi
from posi_jax.data.posi import POSI_FILES, UPSTREAM_COMMIT, load_prompts, resolve_data_file
from posi_jax.errors import PosiError
from tests.conftest import REPO

NAME = "ppo_prompts.json"


class Upstream:
    """A loopback HTTP server laid out like the upstream release (`data/ppo_data.json`, `prompts.p`, ...)."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        upstream = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                upstream.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, name: str, data: bytes) -> None:
        path = self.root / POSI_FILES[name].upstream
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $POSI_DATA, no checkout data folder, an empty cache in tmp_path, the upstream URL on a closed port."""
    monkeypatch.delenv("POSI_DATA", raising=False)
    monkeypatch.setattr(posi, "REPO_DATA_DIR", None)
    monkeypatch.setenv("POSI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POSI_DATA_URL", closed_port_url())
    return tmp_path / "cache"


@pytest.fixture
def upstream(tmp_path):
    server = Upstream(tmp_path / "upstream")
    yield server
    server.stop()


def test_pinned_checksums_match_the_shared_copies(data_dir):
    for name in ("sft_toxic_clean.json", "ppo_prompts.json", "q16_prompts.p"):
        assert hashlib.sha256((data_dir / name).read_bytes()).hexdigest() == POSI_FILES[name].sha256, name


def test_explicit_path_is_used_as_given(tmp_path, isolated):
    f = tmp_path / "my prompts.json"
    f.write_text('[{"instruction": "i", "input": "a cat"}]')
    assert resolve_data_file(f) == f and resolve_data_file(str(f)) == f
    assert load_prompts(f) == ["a cat"]
    with pytest.raises(PosiError, match="data file not found: .*nope.json"):
        resolve_data_file(tmp_path / "nope.json")
    with pytest.raises(PosiError, match="unknown POSI data file; known: posi:sft_toxic_clean.json"):
        resolve_data_file("posi:nope.json")


def test_posi_data_env_first_also_under_the_upstream_name(tmp_path, data_dir, isolated, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(data_dir / NAME, folder / "ppo_data.json")  # the upstream file name
    monkeypatch.setenv("POSI_DATA", str(folder))
    monkeypatch.setattr(posi, "REPO_DATA_DIR", data_dir)  # $POSI_DATA wins over the checkout's folder
    assert resolve_data_file(f"posi:{NAME}") == folder / "ppo_data.json"
    shutil.copy(data_dir / NAME, folder / NAME)
    assert resolve_data_file(f"posi:{NAME}") == folder / NAME
    assert len(load_prompts(f"posi:{NAME}")) == 842
    from posi_jax.evaluation.prompts import read_prompt_set  # the evaluation's prompt sets resolve the same way

    assert [p.prompt for p in read_prompt_set(f"posi:{NAME}")][:1] == ["Emma Watson eating too much spaghetti"]
    assert not isolated.exists()  # found locally: nothing cached, nothing downloaded


def test_checkout_data_folder(tmp_path, monkeypatch):
    # found from the package's own location: this checkout's ../shared/data/posi (where CI lays shared/)
    assert posi.REPO_DATA_DIR == REPO.parent / "shared" / "data" / "posi"
    monkeypatch.delenv("POSI_DATA", raising=False)
    monkeypatch.setenv("POSI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POSI_DATA_URL", closed_port_url())
    assert resolve_data_file("posi:q16_prompts.p") == posi.REPO_DATA_DIR / "q16_prompts.p"
    assert resolve_data_file("posi:sft_toxic_clean.json") == posi.REPO_DATA_DIR / "sft_toxic_clean.json"
    from posi_jax.reward.q16 import load_q16_prompts  # the reward's and the evaluation's Q16 loader resolve it too

    assert load_q16_prompts("posi:q16_prompts.p").shape == (2, 768)
    assert not (tmp_path / "cache").exists()


def test_cache_filled_once_from_upstream_with_checksum(data_dir, isolated, upstream, monkeypatch):
    upstream.put(NAME, (data_dir / NAME).read_bytes())
    monkeypatch.setenv("POSI_DATA_URL", upstream.url)
    path = resolve_data_file(f"posi:{NAME}")
    assert path == isolated / f"posi-{UPSTREAM_COMMIT[:7]}" / NAME
    assert path.read_bytes() == (data_dir / NAME).read_bytes()
    assert upstream.requests == ["/data/ppo_data.json"]
    assert not list(path.parent.glob("*.part"))
    upstream.stop()  # offline now: the cached copy serves
    assert resolve_data_file(f"posi:{NAME}") == path
    assert load_prompts(f"posi:{NAME}")[0] == "Emma Watson eating too much spaghetti"
    # an explicit cache_dir parameter overrides $POSI_JAX_CACHE
    other = isolated.parent / "other"
    with pytest.raises(PosiError, match="not cached"):
        resolve_data_file(f"posi:{NAME}", cache_dir=other)


def test_wrong_checksum_is_refused_and_not_saved(data_dir, isolated, upstream, monkeypatch):
    good = (data_dir / NAME).read_bytes()
    upstream.put(NAME, good.replace(b"Emma Watson", b"Emma Stone!"))
    monkeypatch.setenv("POSI_DATA_URL", upstream.url)
    with pytest.raises(PosiError) as e:
        resolve_data_file(f"posi:{NAME}")
    msg = str(e.value)
    assert f"{upstream.url}/data/ppo_data.json: downloaded file has SHA-256" in msg
    assert f"expected {POSI_FILES[NAME].sha256} (not saved" in msg and "\n" not in msg
    assert not any(p.is_file() for p in isolated.rglob("*"))
    # a corrupted cache entry is not trusted: it is downloaded again (and replaced) when the upstream is right
    target = isolated / f"posi-{UPSTREAM_COMMIT[:7]}" / NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(good[:100])
    upstream.put(NAME, good)
    assert resolve_data_file(f"posi:{NAME}").read_bytes() == good


def test_offline_and_not_cached_says_what_to_download_and_where(isolated, monkeypatch):
    url = os.environ["POSI_DATA_URL"]
    with pytest.raises(PosiError) as e:
        resolve_data_file("posi:test_data.json")
    msg = str(e.value)
    target = isolated / f"posi-{UPSTREAM_COMMIT[:7]}" / "test_data.json"
    assert "\n" not in msg and msg.startswith("posi:test_data.json (evaluation prompts) is not available")
    assert f"download that URL to {target}" in msg and f"{url}/data/test_data.json cannot be downloaded" in msg
    assert POSI_FILES["test_data.json"].sha256 in msg and "set POSI_DATA" in msg
    # without $POSI_DATA_URL the URL named is the pinned upstream release
    monkeypatch.delenv("POSI_DATA_URL")
    assert posi.upstream_url("test_data.json") == (
        f"https://raw.githubusercontent.com/Wu-Zongyu/POSI/{UPSTREAM_COMMIT}/data/test_data.json")


def test_offline_command_exits_2_with_one_error_line(tmp_path):
    """`python -m posi_jax.ppo` with the default prompts, from an installed-like copy of the package (no checkout data
    folder next to it), no $POSI_DATA, an empty cache and no network."""
    pkg = tmp_path / "site"
    shutil.copytree(REPO / "posi_jax", pkg / "posi_jax", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("POSI_DATA", "PYTHONPATH")}
    env.update(PYTHONPATH=str(pkg), POSI_JAX_CACHE=str(cache), POSI_DATA_URL=closed_port_url())
    proc = subprocess.run([sys.executable, "-m", "posi_jax.ppo", "--config", str(REPO / "configs" /
                                                                                 "ppo_smollm2_tiny_sd.yaml"),
                           f"out_dir={tmp_path / 'run'}", "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: posi:ppo_prompts.json (PPO query prompts) is not available")
    assert str(cache / f"posi-{UPSTREAM_COMMIT[:7]}" / "ppo_prompts.json") in lines[0]
