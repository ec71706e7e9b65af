"""The evaluation run: a prompt set -> rewrites -> images for the original and the rewritten prompts -> the paper's
measurements (`scoring`) -> reports (`report`).

Per prompt and overall, for the original prompts and for their rewrites:
- inappropriate probability: the share of a prompt's images flagged inappropriate, an image being flagged when its
  Q16 probability is above 0.5 or NudeNet finds an exposed body part (the I2P protocol), averaged over prompts;
- mean Q16 probability (CLIP ViT-L/14 image embedding against the two Q16 prompts);
- CLIP score (CLIP ViT-B/32 cosine) of the images against the ORIGINAL prompt (is the meaning kept?) and against the
  rewritten one (does the image follow what was asked?);
- text similarity of the rewrite to the original: cosine of their CLIP ViT-B/32 text embeddings, and a cheap lexical
  one (difflib's matching-word ratio).
Prompts with I2P-style categories also get one inappropriate probability per category. With an SD safety checker,
each image's flag and each side's flag rate are reported too.

The methods table generalises the two sides to a list of methods (`methods.py`: original prompt or rewrite, with or
without a negative prompt or SLD), each measured the same way from the same seeds; the default list is the paper's
two sides, so the records, files and resuming are the same code either way.

Everything is resumable: rewrites go to `rewrites.jsonl` and finished prompts to `per_prompt.jsonl` as they are done
(one fsynced line each), so a crash or Ctrl-C loses at most the batch in flight, and the same command resumes.
`settings.json` pins what produced the numbers; resuming with other settings is an error, not a silent mix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from posi_jax.config import check_numbers
from posi_jax.data.jsonl import JsonlAppender, read_jsonl_records
from posi_jax.errors import PosiError
from posi_jax.evaluation.images import ImageGenerator
from posi_jax.evaluation.methods import Method, default_methods
from posi_jax.evaluation.prompts import EvalPrompt
from posi_jax.evaluation.report import aggregate, image_path, write_reports
from posi_jax.evaluation.scoring import Q16_THRESHOLD, Scorer, lexical_similarity, side_metrics

REWRITES_FILE = "rewrites.jsonl"
REWRITE_SETTINGS_FILE = "rewrite_settings.json"
PER_PROMPT_FILE = "per_prompt.jsonl"
SETTINGS_FILE = "settings.json"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    images_per_prompt: int = 10
    seed: int = 0  # prompt i's images (both sides) use seed + i
    batch_prompts: int = 4  # prompts per image-generation call (each gives images_per_prompt images per method)
    q16_threshold: float = Q16_THRESHOLD
    grid_rows: int = 8  # the first prompts shown in grid.png (their images are always saved)
    grid_images: int = 2  # images per side per grid row
    grid_thumb: int = 160
    save_images: bool = False  # save every image as PNG (else only the grid rows')

    BOUNDS: ClassVar[dict[str, str]] = {
        "images_per_prompt": "[1, inf)", "seed": "[0, inf)", "batch_prompts": "[1, inf)", "q16_threshold": "(0, 1)",
        "grid_rows": "[0, inf)", "grid_images": "[1, inf)", "grid_thumb": "[16, inf)"}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_numbers(self, "EvalOptions.")


@dataclasses.dataclass
class EvalResult:
    out_dir: Path
    summary: dict
    records: list[dict]
    n_resumed: int  # prompts found already done in per_prompt.jsonl
    n_evaluated: int  # prompts evaluated by this run
    files: dict[str, Path]


# Settings that do not change a prompt's numbers: a resumed run may change them (e.g. extend --limit, redraw the grid).
UNPINNED_SETTINGS = ("n_prompts", "limit", "grid_rows", "grid_images", "grid_thumb", "save_images", "batch_prompts")


def check_settings(out_dir: Path, settings: dict, name: str = SETTINGS_FILE) -> None:
    """Write the settings file; on a resumed run the settings that change the numbers must be the same as before
    (those in UNPINNED_SETTINGS may differ)."""
    path = out_dir / name
    canonical = json.loads(json.dumps(settings))
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PosiError(f"{path}: not valid JSON ({e.msg}); delete it only together with the results") from None
        diff = sorted(k for k in set(old) | set(canonical)
                      if k not in UNPINNED_SETTINGS and old.get(k) != canonical.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r:.60} → {canonical.get(k)!r:.60}" for k in diff[:3])
            raise PosiError(f"{out_dir} holds results made with other settings ({shown}); use a new --out "
                            "directory, or the same settings to resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(canonical, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _done_records(path: Path, prompts: list[EvalPrompt], key: str) -> dict[int, dict]:
    records, _ = read_jsonl_records(path, repair=True)
    done = {}
    for r in records:
        i = r.get("index")
        if isinstance(i, int) and i >= len(prompts):  # done by an earlier run over more prompts (a larger --limit)
            continue
        if not isinstance(i, int) or i < 0 or r["input"] != prompts[i].prompt:
            raise PosiError(f"{path}: record {r.get('index')!r} ({r['input'][:50]!r}) is not prompt {i} of this "
                            "prompt set; use a new --out directory for another prompt set")
        if key in r:
            done[i] = r
    return done


def rewrite_all(prompts: list[EvalPrompt], out_dir: Path, rewrite_fn: Callable[[list[str], int], list[str]],
                batch: int, log: Callable[[str], None] = lambda m: None, *, settings: dict | None = None) -> list[str]:
    """Rewrites of every prompt, resumable: kept in rewrites.jsonl, a batch at a time. `rewrite_fn(prompts, seed)`
    gets the index of the batch's first prompt as its seed: a run resumed after whole batches samples the remaining
    batches exactly as the uninterrupted run would have. `settings` (the
    checkpoint, sampling ...) are pinned in rewrite_settings.json: resuming with another rewriter is an error."""
    out_dir = Path(out_dir)
    check_settings(out_dir, dict(settings or {}, n_prompts=len(prompts)), REWRITE_SETTINGS_FILE)
    path = out_dir / REWRITES_FILE
    done = _done_records(path, prompts, "output")
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        log(f"rewrites: {len(done)} already in {path}, {len(todo)} to do")
    if todo:
        appender = JsonlAppender(path, lock=True, owner="evaluate")
        try:
            for start in range(0, len(todo), batch):
                idx = todo[start:start + batch]
                outs = rewrite_fn([prompts[i].prompt for i in idx], idx[0])
                for i, out in zip(idx, outs):
                    # an empty rewrite is kept as it is: that is what the rewriter would hand to the T2I model
                    record = {"index": i, "input": prompts[i].prompt, "output": " ".join(out.split())}
                    appender.write(record)
                    done[i] = record
                log(f"rewrites: {len(done)}/{len(prompts)}")
        finally:
            appender.close()
    return [done[i]["output"] for i in range(len(prompts))]


def _score_one(scorer: Scorer, images: np.ndarray) -> tuple:
    """(q16, CLIP image embeddings, NudeNet exposed classes, safety-checker flags or None) of one image array."""
    if not len(images):
        return np.zeros(0), np.zeros((0, 0)), [], None if scorer.safety_checker is None else np.zeros(0, bool)
    return (*scorer.score_images(images), scorer.safety_flags(images))


def _score_all(scorer: Scorer, image_sets: list[np.ndarray]) -> list[tuple]:
    """Score several prompts' images: one call when they all have one size (local SD: always), else one per set."""
    sizes = {im.shape[1:] for im in image_sets if len(im)}
    if len(sizes) != 1:
        return [_score_one(scorer, im) for im in image_sets]
    q16, emb, exposed, flags = _score_one(scorer, np.concatenate([im for im in image_sets if len(im)]))
    out, start = [], 0
    for im in image_sets:
        end = start + len(im)
        out.append((q16[start:end], emb[start:end], exposed[start:end], None if flags is None else flags[start:end]))
        start = end
    return out


def generate_methods(rows: list[int], prompts: list[EvalPrompt], rewrites: list[str], generator: ImageGenerator,
                      options: EvalOptions, methods: list[Method]) -> dict[str, list]:
    """Each method's images of the prompts `rows` (indices; prompt i's images from seed + i whatever the method).
    Methods that share an SLD setting share one generation call; a per-image negative prompt tells them apart."""
    n, seeds = options.images_per_prompt, [options.seed + i for i in rows]
    groups: dict[str | None, list[Method]] = {}
    for m in methods:
        groups.setdefault(m.sld, []).append(m)
    out = {}
    for sld, group in groups.items():
        texts = [rewrites[i] if m.rewritten else prompts[i].prompt for m in group for i in rows]
        kwargs = {} if sld is None else {"sld": sld}
        if any(m.negative_prompt is not None for m in group):
            kwargs["negative_prompts"] = [m.negative_prompt or "" for m in group for _ in rows]
        generated = generator.generate(texts, seeds * len(group), n, **kwargs)
        for j, m in enumerate(group):
            out[m.name] = generated[j * len(rows):(j + 1) * len(rows)]
    return out


def _evaluate_batch(batch: list[int], prompts: list[EvalPrompt], rewrites: list[str], generator: ImageGenerator,
                    scorer: Scorer, options: EvalOptions, out_dir: Path, methods: list[Method]) -> list[dict]:
    from PIL import Image

    # A short last batch is padded with copies of its first prompt (results dropped): one compiled shape.
    pad = options.batch_prompts - len(batch) if generator.fixed_shapes else 0
    generated = generate_methods(batch + [batch[0]] * pad, prompts, rewrites, generator, options, methods)
    # the padding rows are scored too (and dropped after): the scorers' jitted calls keep one shape
    scores = iter(_score_all(scorer, [g.images for m in methods for g in generated[m.name]]))
    by_method = {m.name: [(g, next(scores)) for g in generated[m.name]] for m in methods}

    text_emb = scorer.text_embeddings([prompts[i].prompt for i in batch] + [rewrites[i] for i in batch])
    emb_orig, emb_rew = text_emb[: len(batch)], text_emb[len(batch):]
    records = []
    for j, i in enumerate(batch):
        record = {"index": i, "input": prompts[i].prompt, "prompt": prompts[i].prompt, "rewritten_prompt": rewrites[i],
                  "categories": list(prompts[i].categories), "seed": options.seed + i,
                  "text_similarity_clip": float(np.dot(emb_orig[j], emb_rew[j])),
                  "text_similarity_lexical": lexical_similarity(prompts[i].prompt, rewrites[i])}
        for m in methods:
            g, (q16, emb, exposed, flags) = by_method[m.name][j]
            if len(g.images):
                vs_o, vs_r = scorer.clip_scores(emb, emb_orig[j]), scorer.clip_scores(emb, emb_rew[j])
            else:
                vs_o, vs_r = np.zeros(0), np.zeros(0)
            record[m.name] = side_metrics(q16, exposed, vs_o, vs_r, options.q16_threshold, g.n_refused, g.refusal,
                                          flags)
            if options.save_images or i < options.grid_rows:
                for k, image in enumerate(g.images):
                    p = image_path(out_dir, i, m.name, k)
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(p)
        records.append(record)
    return records


def evaluate(prompts: list[EvalPrompt], rewrites: list[str], out_dir: str | os.PathLike, generator: ImageGenerator,
             scorer: Scorer, options: EvalOptions = EvalOptions(), *, settings: dict | None = None,
             rewriter_name: str = "rewriter", log: Callable[[str], None] = lambda m: None,
             methods: list[Method] | None = None) -> EvalResult:
    """Score original and rewritten prompts (or each of `methods`: the methods table, `evaluation/methods.py`),
    resuming from `out_dir/per_prompt.jsonl`, then write the reports.

    An error in the middle (a server gone, a model failing) is raised as PosiError after the finished prompts are
    safely on disk; the message says how many were kept. The reports are written at the end of a complete run."""
    options.validate()
    out_dir = Path(out_dir)
    if len(rewrites) != len(prompts):
        raise PosiError(f"{len(rewrites)} rewrites for {len(prompts)} prompts")
    settings = dict(settings or {}, **dataclasses.asdict(options), images=generator.description,
                    rewriter=rewriter_name, n_prompts=len(prompts))
    if methods is not None:  # the methods table: which methods, and what each changes, are pinned too
        settings["methods"] = [m.settings() for m in methods]
    check_settings(out_dir, settings)
    run_methods = methods or default_methods(rewriter_name)

    path = out_dir / PER_PROMPT_FILE
    done = _done_records(path, prompts, run_methods[0].name)
    for i, r in done.items():
        if r["rewritten_prompt"] != rewrites[i]:
            raise PosiError(f"{path}: prompt {i} was evaluated with the rewrite {r['rewritten_prompt'][:50]!r}, now "
                            f"{rewrites[i][:50]!r}; use a new --out directory for another rewriter")
    n_resumed = len(done)
    todo = [i for i in range(len(prompts)) if i not in done]
    log(f"evaluate: {len(prompts)} prompts, {n_resumed} already done, {len(todo)} to do")
    t0 = time.monotonic()
    if todo:
        appender = JsonlAppender(path, lock=True, owner="evaluate")
        try:
            for start in range(0, len(todo), options.batch_prompts):
                batch = todo[start:start + options.batch_prompts]
                try:
                    records = _evaluate_batch(batch, prompts, rewrites, generator, scorer, options, out_dir,
                                              run_methods)
                except PosiError as e:
                    raise PosiError(f"{e}; {len(done)} of {len(prompts)} prompts done and kept in {path}, re-run "
                                    "the same command to resume") from None
                for r in records:
                    appender.write(r)
                    done[r["index"]] = r
                rate = (time.monotonic() - t0) / (len(done) - n_resumed)
                log(f"evaluate: {len(done)}/{len(prompts)} prompts ({rate:.2f} s/prompt)")
        finally:
            appender.close()
    records = [done[i] for i in range(len(prompts))]
    summary = aggregate(records, [m.name for m in run_methods])
    files = write_reports(out_dir, records, summary, settings, rewriter_name, grid_rows=options.grid_rows,
                          grid_images=options.grid_images, grid_thumb=options.grid_thumb, methods=methods)
    return EvalResult(out_dir, summary, records, n_resumed, len(todo), files)

