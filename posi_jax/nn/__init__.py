"""Building blocks shared by every model: norms, RoPE, attention, LoRA. Each lives here once."""
