"""Data: POSI datasets and their resolver, prompt files, token batches, resumable JSONL, the OpenAI-compatible client
helpers, and building toxic→clean pairs."""
