"""LoRA on the model's edges: the token embedding and lm_head.

Each token (each logits row, for lm_head) carries its adapter's rows in the edge pool, padded with
row 0, which holds zeros: ``rows [T, k]``. Every product reads a token's own rows in its adapter's
order, so the result does not depend on where in the pool an adapter happens to sit (which depends
on the order adapters were loaded): a greedy request gives the same tokens whatever else was loaded.
On the CPU in float32 the lm_head part runs in the native projection kernel instead
(``LlamaRunner._head``), which reads the same rows the same way.

PEFT's math, per token with its adapter's ``A [r, in]``, ``B [out, r]`` and scale ``s`` (folded
into the pool's B rows, ``[rows, out]``):

    embed_tokens: embed[id] + s * B @ A[:, id]      (A is ``lora_embedding_A [r, vocab]``)
    lm_head:      W @ h     + s * B @ (A @ h)
"""

from __future__ import annotations

import torch
from torch import Tensor


def embed_delta(input_ids: Tensor, rows: Tensor, a_pool: Tensor, b_pool: Tensor, dtype: torch.dtype) -> Tensor:
    """``[T, hidden]``: each token's embedding LoRA, computed in ``dtype`` (the embedding's).
    ``a_pool [R, vocab]``, ``b_pool [R, hidden]``."""
    h = a_pool[rows, input_ids[:, None]].to(dtype)  # [T, k]: column id of each of the token's rows
    return torch.bmm(h[:, None, :], b_pool[rows].to(dtype)).squeeze(1)


def head_delta(hidden: Tensor, rows: Tensor, a_pool: Tensor, b_pool: Tensor) -> Tensor:
    """``[N, vocab]``: each row's lm_head LoRA, in ``hidden``'s dtype. ``a_pool [R, hidden]``, ``b_pool [R, vocab]``.

    Rows that share an adapter (a prompt's scored positions, sequences of one adapter) form one
    block, so each adapter's vocabulary-long B rows are gathered once, not once per row."""
    if rows.shape[0] == 0:  # a step of prefill chunks only: no logits row asked for
        return hidden.new_zeros(0, b_pool.shape[1])
    sets, which = torch.unique(rows, dim=0, return_inverse=True)  # [U, k], [N]
    h = torch.bmm(a_pool[rows].to(hidden.dtype), hidden[:, :, None]).squeeze(2)  # [N, k]
    order = torch.argsort(which, stable=True)
    counts = torch.bincount(which, minlength=sets.shape[0])
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order), device=rows.device) - starts[which[order]]  # place of each row in its block
    blocks = h.new_zeros(sets.shape[0], width, h.shape[1])
    blocks[which[order], slot] = h[order]
    out = torch.bmm(blocks, b_pool[sets].to(hidden.dtype))  # [U, width, vocab]
    delta = torch.empty(len(order), b_pool.shape[1], dtype=out.dtype, device=out.device)
    delta[order] = out[which[order], slot]
    return delta
