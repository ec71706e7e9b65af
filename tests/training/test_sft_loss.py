"""The SFT loss: response-only NLL against a numpy reference, and its gradient equal to the full-head gradient."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def test_response_nll_matches_numpy():
    from posi_jax.training.sft import num_loss_targets, response_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 6))
    mask = np.array([[0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0]], bool)  # holes and trailing padding
    want = 0.0
    for b in range(2):
        for t in range(1, 6):
            if mask[b, t]:
                lp = logits[b, t - 1] - np.log(np.exp(logits[b, t - 1].astype(np.float64)).sum())
                want -= lp[ids[b, t]]
    # The identity head makes the "hidden states" the logits; every row count from the exact one up gives one answer.
    assert num_loss_targets(mask, minimum=4) == 8 and num_loss_targets(mask, minimum=5) == 10 \
        and num_loss_targets(mask) == 12
    for rows in (6, 8, 12):
        total, count = response_nll(lambda h: h, jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), rows)
        assert int(count) == mask[:, 1:].sum() == 6 and abs(float(total) - want) < 1e-4, rows


def test_response_nll_gradient_equals_full_head_gradient():
    """Gathering the response rows before the head changes neither the loss nor its gradient (vs every position)."""
    from posi_jax.training.sft import num_loss_targets, response_nll

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 16, 8)).astype(np.float32))
    head_w = jnp.asarray(rng.normal(size=(8, 29)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, 29, (3, 16)))
    mask = np.zeros((3, 16), bool)
    mask[0, 9:14], mask[1, 3:16], mask[2, 12:13] = True, True, True
    rows = num_loss_targets(mask, minimum=3)
    assert rows == 24 < mask.size

    def loss(h, w, n):
        total, count = response_nll(lambda x: x @ w, h, ids, jnp.asarray(mask), n)
        return total / count

    (l_few, g_few), (l_all, g_all) = (jax.value_and_grad(loss, argnums=(0, 1))(hidden, head_w, n)
                                      for n in (rows, mask.size))
    assert abs(float(l_few) - float(l_all)) < 1e-6
    for a, b in zip(g_few, g_all):
        assert float(jnp.abs(a - b).max()) < 1e-6

