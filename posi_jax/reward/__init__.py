"""Reward scorers: Q16 toxicity, CLIP score, the POSI reward (one jitted function), NudeNet (evaluation only)."""
