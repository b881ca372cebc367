"""LoRA on the model's edges: the token embedding and lm_head, for every token of a step at once.

An edge pool holds few rows (``LoraPool.edge_rows``), so instead of gathering each token's rows the
step multiplies by the pool's first ``top`` rows (up to the highest row in use) and masks: ``mask
[T, top]`` is 1 where the token's adapter owns the row, 0 elsewhere (bare-base tokens, other
adapters, free rows, which hold zeros), so each token sums exactly its own adapter's rank terms:
the other rows add exact zeros.

PEFT's math, per token with its adapter's ``A [r, in]``, ``B [out, r]`` and scale ``s`` (folded
into the pool's B rows):

    embed_tokens: embed[id] + s * B @ A[:, id]      (A is ``lora_embedding_A [r, vocab]``)
    lm_head:      W @ h     + s * B @ (A @ h)
"""

from __future__ import annotations

from torch import Tensor


def embed_delta(input_ids: Tensor, mask: Tensor, a_pool: Tensor, b_pool: Tensor) -> Tensor:
    """``[T, hidden]``: each token's embedding LoRA. ``a_pool [rows, vocab]``, ``b_pool [rows, hidden]``."""
    top = mask.shape[1]
    picked = a_pool[:top].index_select(1, input_ids).T  # [T, top]: column id of every row
    return (picked * mask) @ b_pool[:top]


def head_delta(hidden: Tensor, mask: Tensor, a_pool: Tensor, b_pool: Tensor) -> Tensor:
    """``[N, vocab]``: each row's lm_head LoRA. ``a_pool [rows, hidden]``, ``b_pool [rows, vocab]``."""
    top = mask.shape[1]
    return ((hidden @ a_pool[:top].T) * mask) @ b_pool[:top]

