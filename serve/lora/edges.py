"""LoRA on the model's edges: the token embedding and lm_head, for every token of a step at once.

An edge pool holds few rows (``LoraPool.edge_rows``), so instead of gathering each token's rows the
step multiplies by the whole pool and masks: ``mask [T, rows]`` is 1 where the token's adapter owns
the row, 0 elsewhere (bare-base tokens, other adapters, free rows, which hold zeros), so each token
sums exactly its own adapter's rank terms: the other rows add exact zeros. B is kept as PEFT stores
it, ``[out, rows]`` (one column per rank row): the expansion is then a projection like the base's,
which the native kernel streams once for all tokens (``LlamaRunner`` uses it for lm_head).

PEFT's math, per token with its adapter's ``A [r, in]``, ``B [out, r]`` and scale ``s`` (folded
into the pool's B columns):

    embed_tokens: embed[id] + s * B @ A[:, id]      (A is ``lora_embedding_A [r, vocab]``)
    lm_head:      W @ h     + s * B @ (A @ h)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def embed_delta(input_ids: Tensor, mask: Tensor, a_pool: Tensor, b_cols: Tensor) -> Tensor:
    """``[T, hidden]``: each token's embedding LoRA. ``a_pool [rows, vocab]``, ``b_cols [hidden, rows]``."""
    picked = a_pool.index_select(1, input_ids).T  # [T, rows]: column id of every row
    return F.linear(picked * mask, b_cols)


def head_rank(hidden: Tensor, mask: Tensor, a_pool: Tensor) -> Tensor:
    """``[N, rows]``: each row's lm_head rank activations, ``a_pool [rows, hidden]``, masked to its adapter."""
    return (hidden @ a_pool.T) * mask


def head_delta(hidden: Tensor, mask: Tensor, a_pool: Tensor, b_cols: Tensor) -> Tensor:
    """``[N, vocab]``: each row's lm_head LoRA. ``b_cols [vocab, rows]``."""
    return F.linear(head_rank(hidden, mask, a_pool), b_cols)
