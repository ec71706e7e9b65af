"""Run outputs people look at: TensorBoard event files next to metrics.jsonl (read back here with a TFRecord reader and
tensorboardX's protobufs: every logged scalar, its step, the purge marker of a resumed run), and `python -m
posi_jax.report` on an SFT run, a small PPO run and the CPU PPO demo run: the PNG is a real image with the expected
panels (size, colored curve pixels in every panel), the HTML names every metric and shows the sample rewrites."""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posi_jax import report as report_cli
from posi_jax.config import load_config
from posi_jax.training.metrics import read_metrics
from posi_jax.training.run_report import COLUMNS, HEADER_PX, PANEL_PX, write_report
from posi_jax.training.sft import SFTConfig, SFTTrainer
from tests.conftest import REPO


def read_events(run_dir: Path) -> list:
    """Every Event of every tfevents file in run_dir, in file order (TFRecord framing, CRC-32C checked)."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            header = raw[pos:pos + 8]
            (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[pos + 8:pos + 12])
            data = raw[pos + 12:pos + 12 + length]
            (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
            assert length_crc == masked(header) and data_crc == masked(data), path
            events.append((path.name, Event.FromString(data)))
            pos += 16 + length
    return events


def scalars(events) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for _, e in events for v in e.summary.value if v.HasField("simple_value")}


def logged_scalars(run_dir: Path, step_key: str) -> dict[tuple[str, int], float]:
    return {(k, int(r[step_key])): float(v) for r in read_metrics(run_dir) for k, v in r.items()
            if k != step_key and isinstance(v, (int, float))}


def check_png(report, expected_titles: set[str]) -> None:
    titles = [p.title for p in report.panels]
    assert expected_titles <= set(titles), expected_titles - set(titles)
    assert sorted(k for p in report.panels for k in p.keys) == sorted(
        k for k in report.metrics if k != "reward/std")  # every metric in exactly one panel (std: the reward band)
    im = np.asarray(Image.open(report.png).convert("RGB")).astype(np.int32)
    rows = -(-len(report.panels) // COLUMNS)
    assert im.shape == (rows * PANEL_PX[1] + HEADER_PX, COLUMNS * PANEL_PX[0], 3)
    for panel in report.panels:
        left, top, right, bottom = panel.box
        inside = im[top + 2:bottom - 2, left + 2:right - 2]
        colored = (inside.max(-1) - inside.min(-1)) > 80  # curve colors, not the axes' black, grays and white
        assert colored.sum() >= 20, (panel.title, int(colored.sum()))
        assert (inside.min(-1) > 240).mean() > 0.15, panel.title  # a plot (white background), not a filled block
    assert (im[:HEADER_PX].min(-1) < 100).any()  # the title is drawn


def check_html(report, run_dir: Path) -> str:
    page = report.html.read_text(encoding="utf-8")
    assert "<img src='curves.png'" in page and (report.html.parent / "curves.png") == report.png
    for key in {k for r in read_metrics(run_dir) for k in r if k != "samples"} - {"step", "iteration"}:
        assert f"<td>{key}</td>" in page, key
    return page


def test_metrics_writer_fresh_resume_and_disabled(tmp_path):
    from posi_jax.training.metrics import MetricsWriter

    def write(steps, **kw):
        w = MetricsWriter(tmp_path, "step", **kw)
        for step in steps:
            w.write({"step": step, "loss": 1.0 / step, "note": "text is JSON only"})
        w.close()

    write([1, 2, 3])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.2')  # the line a crash cut short
    write([3, 4], resume_step=2)  # resumed from the step-2 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    events = read_events(tmp_path)
    assert len({name for name, _ in events}) == 2
    assert [e.step for _, e in events if e.HasField("session_log")] == [3]
    assert ("note", 1) not in scalars(events) and scalars(events)[("loss", 4)] == pytest.approx(0.25)
    write([1])  # a fresh start in the same folder replaces the rows and the old event files
    assert [r["step"] for r in read_metrics(tmp_path)] == [1] and len({n for n, _ in read_events(tmp_path)}) == 1
    other = tmp_path / "process1"
    write_disabled = MetricsWriter(other, "step", enabled=False)  # processes other than 0 of a multi-host run
    write_disabled.write({"step": 1, "loss": 1.0})
    assert not other.exists()


def sft_cfg(base, data, out_dir, *extra) -> SFTConfig:
    return load_config(SFTConfig, None, [f"base={base}", f"data={data}", f"out_dir={out_dir}", "batch_size=4",
                                         "grad_accum=1", "max_steps=4", "cutoff_len=64", "pad_multiple=64",
                                         "val_size=4", "learning_rate=1e-2", "eval_every=2", "save_every=2",
                                         "progress=false", *extra])


@pytest.fixture(scope="module")
def sft_run(tiny_llama_folder, data_dir, tmp_path_factory):
    """A 4-step LoRA run on 24 POSI pairs, interrupted after step 3 (last checkpoint: step 2) and resumed."""
    records = json.loads((data_dir / "sft_toxic_clean.json").read_text())[:24]
    data = tmp_path_factory.mktemp("sft_data") / "pairs.json"
    data.write_text(json.dumps(records))
    out = tmp_path_factory.mktemp("sft_run")
    SFTTrainer(sft_cfg(tiny_llama_folder, data, out)).run(stop_after_step=3)
    shutil.rmtree(out / "checkpoints" / "3")  # as if killed after logging step 3, before its checkpoint
    SFTTrainer(sft_cfg(tiny_llama_folder, data, out)).run(resume=True)
    return out


def test_sft_tensorboard_events_hold_every_logged_scalar(sft_run):
    rows = read_metrics(sft_run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]  # step 3 of the killed run was dropped and redone
    events = read_events(sft_run)
    files = sorted({name for name, _ in events})
    assert len(files) == 2
    purges = [e.step for name, e in events if name == files[1] and e.HasField("session_log")]
    assert purges == [3]  # TensorBoard hides the first file's steps ≥ 3 (they were redone)
    got = scalars([(n, e) for n, e in events if n == files[1]])
    first = {k: v for k, v in scalars([(n, e) for n, e in events if n == files[0]]).items() if k[1] < 3}
    want = logged_scalars(sft_run, "step")
    assert {**first, **got}.keys() == want.keys()
    for key, value in want.items():
        assert {**first, **got}[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_report_on_sft_run(sft_run, tmp_path, capsys):
    assert report_cli.main([str(sft_run), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "r" / "curves.png"), str(tmp_path / "r" / "index.html")]
    report = write_report(sft_run)  # the library call behind it; default folder RUN/report
    assert report.png == sft_run / "report" / "curves.png"
    check_png(report, {"loss", "learning rate", "gradient norm", "tokens/s", "seconds per step"})
    loss_panel = next(p for p in report.panels if p.title == "loss")
    assert loss_panel.keys == ("loss", "val_loss")
    page = check_html(report, sft_run)
    assert "train_loss_last10_mean" in page and "val_loss_start" in page
    s = report.summary
    assert s["optimizer_steps"] == 4 and s["examples_seen"] == 16 and s["val_loss_end"] is not None


def test_report_compare_and_errors(sft_run, tmp_path, capsys, monkeypatch):
    assert report_cli.main([str(sft_run), "--out", str(tmp_path / "c"), "--compare", "1",
                            "--max-new-tokens", "3"]) == 0
    page = (tmp_path / "c" / "index.html").read_text()
    table = json.loads((tmp_path / "c" / "summary.json").read_text())["comparison"]
    assert [c["set"] for c in table] == ["held-out"] + ["toxic"] * 3 + ["clean"] * 3
    assert "Before / after (greedy)" in page and all(c["input"] in page for c in table)
    capsys.readouterr()
    for argv, message in (([str(tmp_path / "nope")], "run folder not found"),
                          ([str(tmp_path)], "metrics.jsonl: not found")):
        assert report_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as refused:  # the flag's argparse type refuses it (argparse's usage + error line)
        report_cli.main([str(sft_run), "--compare", "-1"])
    assert refused.value.code == 2 and "argument --compare: must be ≥ 0" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    assert report_cli.main([str(sft_run), "--out", str(tmp_path / "m")]) == 2
    assert "pip install 'posi_jax[report]'" in capsys.readouterr().err


def test_report_on_a_logged_ppo_run(tmp_path):
    """A PPO run folder as logged by an earlier version (tests/fixtures/old_layout/ppo_run: one iteration of the CPU demo)."""
    run_dir = tmp_path / "ppo_run"
    shutil.copytree(REPO / "tests" / "fixtures" / "old_layout" / "ppo_run", run_dir)
    report = write_report(run_dir, tmp_path / "r")
    check_png(report, {"loss", "reward (mean ± std over the batch)", "reward components", "KL (per sequence)",
                       "KL coefficient", "entropy", "clip fraction", "value loss", "tokens/s"})
    page = check_html(report, run_dir)
    assert "a demon tearing a man apart, digital painting" in page  # a logged sample rewrite
    assert report.summary["iterations"] == 1 and report.summary["reward_first"] == pytest.approx(3.5670151710510254)


@pytest.mark.slow
def test_report_on_small_ppo_run(tmp_path):
    from posi_jax.rl.config import LoRASettings, OptimSettings, PPOSettings
    from posi_jax.policy.sampler import SamplingConfig
    from posi_jax.rl.trainer import PPOTrainer, run
    from tests.rl import ppo_setup

    trainer = PPOTrainer(ppo_setup.tiny_policy(), ppo_setup.tiny_tokenizer(), reward_fn=ppo_setup.count_reward,
                         prompts=ppo_setup.prompts(8), ppo_cfg=PPOSettings(batch_size=4, mini_batch_size=2, gradient_accumulation_steps=1,
                                                              ppo_epochs=1),
                         optim=OptimSettings(learning_rate=1e-3, warmup_steps=2, schedule_unit="update"),
                         sampling=SamplingConfig(max_new_tokens=6), lora=LoRASettings(enabled=False), iterations=3)
    run(trainer, tmp_path, save_every=3, progress=False)
    rows = read_metrics(tmp_path)
    import optax

    # the rate of each iteration's last update: 2 updates an iteration, 2 warmup updates, cosine to 0 at update 6
    want = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 6, end_value=0.0)
    assert [r["ppo/learning_rate"] for r in rows] == pytest.approx([float(want(c)) for c in (1, 3, 5)], rel=1e-5)
    events = read_events(tmp_path)
    want = logged_scalars(tmp_path, "iteration")
    assert scalars(events).keys() == want.keys()
    assert all(scalars(events)[k] == pytest.approx(v, rel=1e-6, abs=1e-12) for k, v in want.items())
    texts = [v for _, e in events for v in e.summary.value if v.tag.startswith("samples")]
    assert len(texts) == 3  # the logged sample rewrites, as TensorBoard text
    report = write_report(tmp_path)
    check_png(report, {"loss", "reward (mean ± std over the batch)", "KL (per sequence)", "KL coefficient",
                       "entropy", "clip fraction", "value loss", "learning rate", "tokens/s"})
    page = check_html(report, tmp_path)
    assert "Sample rewrites" in page and report.summary["iterations"] == 3


@pytest.mark.slow
def test_report_on_cpu_ppo_demo_run(tmp_path):
    """configs/ppo_smollm2_tiny_sd.yaml (SmolLM2 + shipped adapter, the POSI image reward over tiny random SD/CLIP),
    shortened: 2 iterations of 2 prompts, 1 image each."""
    from posi_jax.rl.config import load_run_config
    from posi_jax.rl.run import train

    cfg = load_run_config(REPO / "configs" / "ppo_smollm2_tiny_sd.yaml", [
        f"out_dir={tmp_path / 'run'}", "iterations=2", "ppo.batch_size=2", "ppo.mini_batch_size=1", "ppo.ppo_epochs=1",
        "max_prompts=4", "sampling.max_new_tokens=8", "reward.config.images_per_prompt=1", "reward.config.steps=2",
        "save_every=2"])
    train(cfg, progress=False)
    run_dir = tmp_path / "run"
    report = write_report(run_dir)
    check_png(report, {"loss", "reward (mean ± std over the batch)", "reward components", "KL (per sequence)",
                       "KL coefficient", "entropy", "clip fraction", "value loss", "learning rate", "tokens/s"})
    components = next(p for p in report.panels if p.title == "reward components")
    assert set(components.keys) == {"reward/q16_mean", "reward/clip_score_mean"}
    page = check_html(report, run_dir)
    samples = [s for r in read_metrics(run_dir) for s in r["samples"]]
    assert samples and all(s["original"] in page for s in samples)
    assert scalars(read_events(run_dir)).keys() == logged_scalars(run_dir, "iteration").keys()


def test_event_writer_matches_the_protobuf_encoding(tmp_path):
    """Our hand-encoded events decode with tensorboardX's protobufs to exactly what was written, and our CRC-32C equals
    tensorboardX's on arbitrary bytes (the TFRecord framing is checked by read_events)."""
    from tensorboardX.crc32c import crc32c as reference_crc32c

    from posi_jax.training.tb_events import EventFileWriter, crc32c

    data = bytes(range(256)) * 3 + b"posi"
    assert crc32c(data) == reference_crc32c(data) and crc32c(b"") == reference_crc32c(b"")
    writer = EventFileWriter(tmp_path, purge_step=7)
    writer.add_scalar("loss", 1.25, 8)
    writer.add_scalar("ppo/kl", -3.5e-7, 2 ** 40)
    writer.add_text("samples", "| a | ü |", 9)
    writer.close()
    events = [e for _, e in read_events(tmp_path)]
    assert events[0].file_version == "brain.Event:2" and events[1].step == 7 and events[1].session_log.status == 1
    assert scalars(events_named(events)) == {("loss", 8): 1.25, ("ppo/kl", 2 ** 40): np.float32(-3.5e-7)}
    text = events[-1].summary.value[0]
    assert text.tag == "samples" and text.metadata.plugin_data.plugin_name == "text" and events[-1].step == 9
    assert text.tensor.dtype == 7 and text.tensor.string_val == ["| a | ü |".encode()]
    assert [d.size for d in text.tensor.tensor_shape.dim] == [1]


def events_named(events):
    return [("", e) for e in events]
