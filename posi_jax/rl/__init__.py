"""Reinforcement learning: PPO math, KL control, settings, model views, jitted steps, the trainer and a run."""
