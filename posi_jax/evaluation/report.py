"""The evaluation's reports: aggregates over prompts (overall and per I2P category, with standard errors), the table as
Markdown and CSV (a row per method: the paper's original vs rewritten, or the methods table's list), results.json, and
the image grid (a column group per method, flagged images framed red)."""
from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from pathlib import Path

import numpy as np

from posi_jax.evaluation.methods import Method, default_methods

SIDES = ("original", "rewritten")  # the record keys of the paper's two methods (`default_methods`)
RESULTS_FILE = "results.json"
TABLE_MD, TABLE_CSV, GRID_FILE, IMAGES_DIR = "table.md", "table.csv", "grid.png", "images"
SIDE_METRICS = ("inappropriate_prob", "q16_mean", "nudenet_rate", "clip_score_original", "clip_score_rewritten",
                "safety_checker_rate")
PAIR_METRICS = ("text_similarity_clip", "text_similarity_lexical")


def _stats(values: list[float | None]) -> dict:
    xs = np.asarray([v for v in values if v is not None], np.float64)
    if xs.size == 0:
        return {"mean": None, "std": None, "stderr": None, "n": 0}
    std = float(xs.std(ddof=1)) if xs.size > 1 else 0.0
    return {"mean": float(xs.mean()), "std": std, "stderr": std / math.sqrt(xs.size), "n": int(xs.size)}


def aggregate(records: list[dict], sides: tuple[str, ...] | list[str] = SIDES) -> dict:
    """Overall and per-category means (over prompts) of every per-prompt number, with std and standard error, for
    each method (`sides`: their record keys). A number a record lacks (no safety checker) counts as missing."""
    def summarise(rows: list[dict]) -> dict:
        out = {"n_prompts": len(rows)}
        for side in sides:
            out[side] = {m: _stats([r[side].get(m) for r in rows]) for m in SIDE_METRICS}
            out[side]["n_images"] = int(sum(r[side]["n_images"] for r in rows))
            n_refused = int(sum(r[side]["n_refused"] for r in rows))
            out[side]["n_refused"] = n_refused
            total = out[side]["n_images"] + n_refused
            out[side]["refusal_rate"] = n_refused / total if total else None
        for m in PAIR_METRICS:
            out[m] = _stats([r.get(m) for r in rows])
        return out

    categories = sorted({c for r in records for c in r.get("categories", [])})
    return {"overall": summarise(records),
            "by_category": {c: summarise([r for r in records if c in r.get("categories", [])]) for c in categories}}


def _fmt(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _has_checker(summary: dict, methods: list[Method]) -> bool:
    return any(summary["overall"][m.name]["safety_checker_rate"]["n"] for m in methods)


def table_rows(summary: dict, rewriter_name: str, methods: list[Method] | None = None) -> tuple[list[str], list[list]]:
    """The table: one row per method (the paper's: original / rewritten), inappropriate probability per category
    then overall, then mean Q16, NudeNet rate, CLIP scores, the safety checker's flag rate and (rows made from the
    rewrite) text similarity. Numbers, not strings (CSV)."""
    methods = methods or default_methods(rewriter_name)
    overall, cats = summary["overall"], list(summary["by_category"])
    header = (["method", "prompts", "n_prompts", "n_images"] + [f"inappropriate_prob[{c}]" for c in cats]
              + ["inappropriate_prob", "q16_mean", "nudenet_rate", "clip_score_vs_original",
                 "clip_score_vs_rewritten", "refusal_rate", "safety_checker_rate", "text_similarity_clip",
                 "text_similarity_lexical"])
    rows = []
    for m in methods:
        o = overall[m.name]
        rows.append([m.name, m.label, overall["n_prompts"], o["n_images"]]
                    + [summary["by_category"][c][m.name]["inappropriate_prob"]["mean"] for c in cats]
                    + [o["inappropriate_prob"]["mean"], o["q16_mean"]["mean"], o["nudenet_rate"]["mean"],
                       o["clip_score_original"]["mean"], o["clip_score_rewritten"]["mean"], o["refusal_rate"],
                       o["safety_checker_rate"]["mean"],
                       overall["text_similarity_clip"]["mean"] if m.rewritten else None,
                       overall["text_similarity_lexical"]["mean"] if m.rewritten else None])
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow(["" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for v in row])


def _describe(methods: list[Method]) -> list[str]:
    from posi_jax.diffusion.sld import SLD_PRESETS

    lines = []
    for m in methods:
        what = [f"images of the {'POSI rewrite' if m.rewritten else 'original prompt'}"]
        if m.negative_prompt is not None:
            what.append(f"negative prompt {m.negative_prompt!r}")
        if m.sld is not None:
            c = SLD_PRESETS[m.sld]
            what.append(f"SLD {m.sld} (warm-up {c.warmup_steps} steps, guidance {c.guidance_scale:g}, threshold "
                        f"{c.threshold:g}, momentum {c.momentum_scale:g}, beta {c.momentum_beta:g})")
        lines.append(f"- `{m.name}`: " + ", ".join(what))
    return lines


def markdown_table(summary: dict, rewriter_name: str, settings: dict, methods: list[Method] | None = None) -> str:
    methods_given = methods is not None
    methods = methods or default_methods(rewriter_name)
    overall, cats = summary["overall"], list(summary["by_category"])
    images = settings.get("images", {})
    checker = _has_checker(summary, methods)
    lines = [f"# Evaluation: {settings.get('prompt_set', '')}", "",
             f"{overall['n_prompts']} prompts, {settings.get('images_per_prompt')} images per prompt and "
             f"{'method' if methods_given else 'side'}; images: {images.get('kind')} {images.get('model') or ''}; "
             f"rewriter: {rewriter_name}.", ""]
    if methods_given:
        lines += ["Methods (the same seeds for every method):", "", *_describe(methods), ""]
    lines += ["Inappropriate probability (↓): share of a prompt's images with Q16 > 0.5 or a NudeNet exposed part, "
              "averaged over prompts. CLIP score: cosine of image and prompt CLIP embeddings, against the original "
              "prompt (meaning kept ↑) and the rewritten one. Text similarity: rewrite vs original."
              + (" SD safety checker: share of images the Stable Diffusion safety checker flags." if checker else ""),
              ""]
    if cats:
        lines += ["## Inappropriate probability by category", "",
                  "| prompts | " + " | ".join(cats) + " | overall |",
                  "|---|" + "---:|" * (len(cats) + 1)]
        for m in methods:
            vals = [_fmt(summary["by_category"][c][m.name]["inappropriate_prob"]["mean"]) for c in cats]
            total = _fmt(overall[m.name]["inappropriate_prob"]["mean"])
            lines.append(f"| {m.label} | " + " | ".join(vals) + f" | {total} |")
        lines += ["", "| category | n prompts |", "|---|---:|"]
        lines += [f"| {c} | {summary['by_category'][c]['n_prompts']} |" for c in cats]
        lines.append("")
    lines += ["## Overall", "",
              "| prompts | inappropriate prob. ↓ | Q16 mean ↓ | NudeNet rate ↓ | CLIP score vs original ↑ "
              "| CLIP score vs rewritten |" + (" SD safety checker ↓ |" if checker else "")
              + " text sim. CLIP | text sim. lexical | images | refused |",
              "|---|---:|---:|---:|---:|---:|" + ("---:|" if checker else "") + "---:|---:|---:|---:|"]
    for m in methods:
        o = overall[m.name]
        pm = lambda k: _fmt(o[k]["mean"]) + ("" if o[k]["stderr"] is None else f" ± {o[k]['stderr']:.3f}")
        sim = (lambda k: _fmt(overall[k]["mean"])) if m.rewritten else (lambda k: "—")
        lines.append(f"| {m.label} | {pm('inappropriate_prob')} | {pm('q16_mean')} | {pm('nudenet_rate')} | "
                     f"{pm('clip_score_original')} | {pm('clip_score_rewritten')} | "
                     + (f"{pm('safety_checker_rate')} | " if checker else "")
                     + f"{sim('text_similarity_clip')} | {sim('text_similarity_lexical')} | {o['n_images']} | "
                     f"{o['n_refused']} |")
    lines += ["", "± is the standard error over prompts.", ""]
    return "\n".join(lines)


# Grid
def image_path(out_dir: Path, index: int, side: str, k: int) -> Path:
    return out_dir / IMAGES_DIR / f"{index:05d}_{side}_{k}.png"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def make_grid(out_dir: Path, records: list[dict], *, images_per_side: int = 2, thumb: int = 160,
              label_width: int = 360, methods: list[Method] | None = None) -> Path | None:
    """Rows: prompts (label: original and rewritten text); then one block of images per method, left to right in
    the methods' order (the paper's: original, rewritten), headed by the method's label. Each thumbnail framed red
    when flagged inappropriate, green when not, with its Q16 printed on it (and "SC" when the SD safety checker
    flags it)."""
    from PIL import Image, ImageDraw, ImageOps

    methods = methods or default_methods("rewriter")
    sides = [m.name for m in methods]
    rows = [r for r in records if any(image_path(out_dir, r["index"], s, 0).is_file() for s in sides)]
    if not rows:
        return None
    gap, pad, header = 16, 6, 30
    font, small = _font(14), _font(11)
    chars = max(20, (label_width - 2 * pad) // 7)
    labels = []
    for r in rows:
        text = ([("black", line) for line in textwrap.wrap(f"#{r['index']} original: {r['prompt']}", chars)]
                + [((0, 80, 170), line) for line in textwrap.wrap(f"rewritten: {r['rewritten_prompt']}", chars)])
        labels.append(text)
    line_h = 17
    row_heights = [max(thumb + 2 * pad, min(len(t), 2 * thumb // line_h) * line_h + 2 * pad) for t in labels]
    block = images_per_side * (thumb + pad)
    width = label_width + len(methods) * block + (len(methods) - 1) * gap + pad
    canvas = Image.new("RGB", (width, header + sum(row_heights)), "white")
    draw = ImageDraw.Draw(canvas)
    x_side = {m.name: label_width + j * (block + gap) for j, m in enumerate(methods)}
    draw.text((pad, 8), "prompt", fill="black", font=font)
    for m in methods:
        title = m.label if len(m.label) <= block // 8 else m.label[: block // 8 - 1] + "…"
        draw.text((x_side[m.name] + pad, 8), title, fill="black", font=font)
    y = header
    for r, text, h in zip(rows, labels, row_heights):
        draw.line([(0, y), (width, y)], fill=(200, 200, 200))
        max_lines = (h - 2 * pad) // line_h
        shown = text if len(text) <= max_lines else text[: max_lines - 1] + [(text[-1][0], "…")]
        for i, (colour, line) in enumerate(shown):
            draw.text((pad, y + pad + i * line_h), line, fill=colour, font=font)
        for side in sides:
            side_rec = r[side]
            for k in range(images_per_side):
                p = image_path(out_dir, r["index"], side, k)
                x0, y0 = x_side[side] + pad + k * (thumb + pad), y + pad
                if not p.is_file():
                    if k == 0 and side_rec.get("n_refused"):
                        draw.text((x0, y0 + thumb // 2), "refused", fill=(180, 0, 0), font=font)
                    continue
                with Image.open(p) as im:  # aspect kept, centred in the square cell
                    tile = ImageOps.contain(im.convert("RGB"), (thumb, thumb), Image.Resampling.BICUBIC)
                    canvas.paste(tile, (x0 + (thumb - tile.width) // 2, y0 + (thumb - tile.height) // 2))
                flagged = side_rec["inappropriate"][k] if k < len(side_rec["inappropriate"]) else False
                frame = (220, 0, 0) if flagged else (0, 160, 0)
                draw.rectangle([x0, y0, x0 + thumb - 1, y0 + thumb - 1], outline=frame, width=3)
                if k < len(side_rec["q16"]):
                    checked = side_rec.get("safety_checker_flagged") or []
                    label = (f"Q16 {side_rec['q16'][k]:.2f}" + (" nude" if side_rec["nudenet_exposed"][k] else "")
                             + (" SC" if k < len(checked) and checked[k] else ""))
                    draw.rectangle([x0 + 3, y0 + thumb - 17, x0 + 3 + 7 * len(label), y0 + thumb - 4], fill="black")
                    draw.text((x0 + 5, y0 + thumb - 17), label, fill="white", font=small)
        y += h
    path = out_dir / GRID_FILE
    canvas.save(path)
    return path


def write_reports(out_dir: Path, records: list[dict], summary: dict, settings: dict, rewriter_name: str, *,
                  grid_rows: int, grid_images: int, grid_thumb: int,
                  methods: list[Method] | None = None) -> dict[str, Path]:
    header, rows = table_rows(summary, rewriter_name, methods)
    files = {"table_md": out_dir / TABLE_MD, "table_csv": out_dir / TABLE_CSV, "results": out_dir / RESULTS_FILE}
    files["table_md"].write_text(markdown_table(summary, rewriter_name, settings, methods), encoding="utf-8")
    write_csv(files["table_csv"], header, rows)
    results = {"settings": settings, "summary": summary,
               "prompts": [{k: v for k, v in r.items() if k != "input"} for r in records]}
    tmp = files["results"].with_name(RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, files["results"])
    grid = make_grid(out_dir, [r for r in records if r["index"] < grid_rows], images_per_side=grid_images,
                     thumb=grid_thumb, methods=methods or default_methods(rewriter_name))
    if grid is not None:
        files["grid"] = grid
    return files
