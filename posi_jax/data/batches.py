"""Token examples (ids + response-only loss mask) and their length-bucketed, padded batches: pure numpy.

An `Example` is what `posi_jax.policy.chat.encode_example` makes of a POSI record; `bucketed_batches` turns a list of
them into one epoch of right-padded batches whose order is a pure function of (seed, epoch), so a resumed run sees
the same data in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from posi_jax.errors import PosiError


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # [T] int32: prompt tokens then response tokens
    loss_mask: np.ndarray  # [T] bool: True on response tokens (the tokens the model is trained to produce)


@dataclass(frozen=True)
class Batch:
    ids: np.ndarray  # [B, T] int32, right-padded with pad_id
    attention_mask: np.ndarray  # [B, T] bool
    loss_mask: np.ndarray  # [B, T] bool: True where ids[t] is a response token to predict from ids[:t]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pad_batch(examples: list[Example], pad_id: int, pad_multiple: int = 1, batch_size: int | None = None) -> Batch:
    """Right-pad to the longest example rounded up to `pad_multiple` (few distinct shapes → few compilations).

    With `batch_size`, missing rows are all padding (no tokens, no loss), so the last batch keeps the same shape.
    """
    rows = batch_size or len(examples)
    length = max(len(e.ids) for e in examples)
    length = -(-length // pad_multiple) * pad_multiple
    ids = np.full((rows, length), pad_id, np.int32)
    attn = np.zeros((rows, length), bool)
    loss = np.zeros((rows, length), bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n], attn[i, :n], loss[i, :n] = e.ids, True, e.loss_mask
    return Batch(ids, attn, loss)


def bucketed_batches(examples: list[Example], batch_size: int, *, pad_id: int, seed: int, epoch: int,
                     pad_multiple: int = 32, bucket_batches: int = 16, shuffle: bool = True) -> list[Batch]:
    """One epoch of length-bucketed padded batches, a pure function of (seed, epoch).

    Examples are shuffled, cut into windows of `bucket_batches` batches, sorted by length inside each window (similar
    lengths share a batch: little padding), and the batches are shuffled again. Without `shuffle` (validation) the
    order is simply by length.
    """
    if not examples:
        raise PosiError("no examples to batch")
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(examples))
        window = batch_size * bucket_batches
        order = np.concatenate([sorted(order[i:i + window], key=lambda j: len(examples[j].ids))
                                for i in range(0, len(order), window)])
    else:
        rng = None
        order = np.asarray(sorted(range(len(examples)), key=lambda j: len(examples[j].ids)))
    batches = [pad_batch([examples[j] for j in order[i:i + batch_size]], pad_id, pad_multiple, batch_size)
               for i in range(0, len(order), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
