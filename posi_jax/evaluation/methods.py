"""The methods an evaluation compares: how each prompt's images are made.

A method is a text (the original prompt, or its POSI rewrite) plus optional safety measures inside Stable Diffusion
(a negative prompt, SLD guidance). The paper's comparison is two methods, `original` and `rewritten`; the methods table
(`evaluate --methods`) runs any list of them on the same prompts with the same seeds, so the methods differ only by
what they change. Each method is one entry of a per-prompt record, one row of the table and one column group of the
grid.

`--methods` syntax: a comma-separated list; each method joins parts with "+": `original` (the default text), `posi`
(the rewrite), `negative` (the --negative prompt), `sld` (the --sld preset, default medium) or `sld-PRESET`
(weak / medium / strong / max). `all` stands for the six methods of the issue that introduced the table:
original, posi, negative, sld, posi+negative, posi+sld.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from posi_jax.diffusion.sld import SLD_PRESETS, sld_config
from posi_jax.errors import PosiError

ALL_METHODS = ("original", "posi", "negative", "sld", "posi+negative", "posi+sld")
DEFAULT_SLD_PRESET = "medium"  # the reference pipeline's default arguments


@dataclass(frozen=True)
class Method:
    name: str  # record key, image-file tag (images/00000_{name}_0.png)
    label: str  # table row and grid column header
    rewritten: bool  # images of the POSI rewrite (else of the original prompt)
    negative_prompt: str | None = None  # None: the generator's default (none in the methods table)
    sld: str | None = None  # an SLD preset name, or None

    def settings(self) -> dict:
        """What makes this method's numbers (pinned in settings.json)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "label"}


def default_methods(rewriter_name: str) -> list[Method]:
    """The paper's comparison: the original prompts and their rewrites, with the generator's own settings."""
    return [Method("original", "original prompts", False), Method("rewritten", f"rewritten ({rewriter_name})", True)]


def _parse_one(text: str, negative: str | None, sld: str | None, rewriter_name: str) -> Method:
    parts = [p.strip().lower() for p in text.split("+")]
    if "original" in parts and "posi" in parts:
        raise PosiError(f"--methods: {text!r} asks for both the original prompt and the POSI rewrite")
    rewritten, use_negative, preset = False, False, None
    for part in parts:
        if part == "original":
            continue
        if part == "posi":
            rewritten = True
        elif part == "negative":
            if negative is None:
                raise PosiError(f"--methods: {text!r} needs the negative prompt: give --negative TEXT")
            use_negative = True
        elif part == "sld" or (part.startswith("sld-") and part[4:] in SLD_PRESETS):
            if preset is not None:
                raise PosiError(f"--methods: {text!r} has two SLD parts")
            if part != "sld":
                preset = part[4:]
            else:
                preset = DEFAULT_SLD_PRESET if sld_config(sld) is None else sld.lower()
        else:
            raise PosiError(f"--methods: unknown part {part!r} in {text!r} (parts: original, posi, negative, sld, "
                            f"sld-{'/'.join(SLD_PRESETS)}; joined with '+', e.g. posi+sld)")
    name = "+".join(["posi"] * rewritten + ["negative"] * use_negative + [f"sld-{preset}"] * (preset is not None))
    labels = ([f"POSI ({rewriter_name})"] * rewritten + ["negative prompt"] * use_negative
              + [f"SLD {preset}"] * (preset is not None))
    return Method(name or "original", " + ".join(labels) or "original prompts", rewritten,
                  negative if use_negative else None, preset)


def parse_methods(spec: str, *, negative: str | None = None, sld: str | None = None,
                  rewriter_name: str = "rewriter") -> list[Method]:
    """`--methods` (see the module docstring) -> methods in the given order, each once."""
    items = [t.strip() for t in spec.split(",") if t.strip()]
    items = [m for t in items for m in (ALL_METHODS if t.lower() == "all" else (t,))]
    if not items:
        raise PosiError("--methods: no methods given")
    methods, seen = [], {}
    for text in items:
        method = _parse_one(text, negative, sld, rewriter_name)
        if method.name in seen:
            raise PosiError(f"--methods: {text!r} is the same method as {seen[method.name]!r}")
        seen[method.name] = text
        methods.append(method)
    return methods
