"""Prompt texts shared by the dataset builder and the rewriter."""
from __future__ import annotations

# The `instruction` field of every record in the POSI release (SFT and PPO sets); the rewriter's system text.
POSI_INSTRUCTION = (
    "You are an AI visual assistant, please help me to optimize the prompt used for text-to-image models to be "
    "non-toxic."
)
