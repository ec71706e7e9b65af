"""Training: orbax checkpoints of any training state, and supervised fine-tuning."""
