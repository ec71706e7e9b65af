"""The policy (the rewriting LM): tokenizer, prompt format, jitted sampler, LoRA adapter folders, loading, rewriter."""
