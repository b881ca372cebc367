"""Batched LoRA math over stacked adapter rows: pure functions with fixed shapes.

Tokens of a step are grouped into ``NB`` blocks of ``L`` token positions (padded); every block
belongs to one sequence, hence one adapter, whose rank rows in a stacked pool are listed in
``rows[NB, k]`` (padded with row 0, which holds zeros). Decode steps have ``L == 1``; a prefill
chunk fills blocks of up to ``L`` tokens. Tokens of bare-base sequences are in no block.
This is the pure-torch backend (gather + bmm); a fused kernel can replace it behind the same
signatures. Gathered rows can be kept across steps while a batch's adapters stay the same (see
``LoraPool.batch_rows``): decode steps then only read them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather_blocks(x: Tensor, token_index: Tensor | None, num_blocks: int, block_len: int) -> Tensor:
    """Lay tokens out in blocks: ``x[T, d] -> [NB, L, d]``.

    Semantics::

        for b in range(NB):
            for i in range(L):
                out[b, i] = x[token_index[b * L + i]]

    ``token_index`` None means the identity (tokens already in block order, no padding).
    """
    if token_index is None:
        return x.view(num_blocks, block_len, x.shape[-1])
    return x.index_select(0, token_index).view(num_blocks, block_len, x.shape[-1])


def gather_rows(stacked: Tensor, rows: Tensor) -> Tensor:
    """Each block's adapter rows out of a pool: ``[R, d], [NB, k] -> [NB, k, d]`` (also ``[Lyr, R, d] -> [Lyr, NB, k, d]``).

    Semantics::

        for b in range(NB):
            for j in range(k):
                out[b, j] = stacked[rows[b, j]]
    """
    flat = stacked.index_select(-2, rows.view(-1))
    return flat.view(*stacked.shape[:-2], rows.shape[0], rows.shape[1], stacked.shape[-1])


def shrink(x_blocks: Tensor, a_blocks: Tensor) -> Tensor:
    """Project block tokens onto their adapter's A rows: ``[NB, L, in], [NB, k, in] -> [NB, L, k]``.

    Semantics::

        for b in range(NB):
            for j in range(k):
                out[b, :, j] = x_blocks[b] @ a_blocks[b, j]
    """
    return torch.bmm(x_blocks, a_blocks.transpose(1, 2))


def expand(h: Tensor, b_blocks: Tensor) -> Tensor:
    """Map rank activations back through B rows (scale folded in): ``[NB, L, k], [NB, k, out] -> [NB, L, out]``.

    Semantics::

        for b in range(NB):
            for j in range(k):
                out[b] += h[b, :, j:j+1] * b_blocks[b, j]
    """
    return torch.bmm(h, b_blocks)


def expand_add(y_blocks: Tensor, h: Tensor, b_blocks: Tensor) -> None:
    """``expand`` accumulated in place into a view of the output: ``y_blocks[NB, L, out] += h @ b_blocks``.

    Semantics::

        for b in range(NB):
            for j in range(k):
                y_blocks[b] += h[b, :, j:j+1] * b_blocks[b, j]
    """
    y_blocks.baddbmm_(h, b_blocks)


def scatter_add(y: Tensor, y_blocks: Tensor, block_pos: Tensor | None, token_ids: Tensor | None) -> None:
    """Add block outputs back to their tokens, in place: ``y[T, out] += y_blocks[NB, L, out]``.

    Semantics::

        for t, p in zip(token_ids, block_pos):
            y[t] += y_blocks.view(-1, out)[p]

    Both None means the identity (every token of ``y`` is in a block, in order).
    """
    flat = y_blocks.view(-1, y_blocks.shape[-1])
    if block_pos is None:
        y += flat
    elif token_ids is None:
        y += flat.index_select(0, block_pos)
    else:
        y.index_add_(0, token_ids, flat.index_select(0, block_pos))


def expand_scatter_add(y: Tensor, h: Tensor, b_blocks: Tensor, block_pos: Tensor | None,
                       token_ids: Tensor | None) -> None:
    """``scatter_add(y, expand(h, b_blocks), block_pos, token_ids)``, with no intermediate when
    the blocks are ``y``'s tokens in order (both None): then the product accumulates into ``y``.
    """
    if block_pos is None and token_ids is None:
        expand_add(y.view(h.shape[0], h.shape[1], y.shape[-1]), h, b_blocks)
    else:
        scatter_add(y, expand(h, b_blocks), block_pos, token_ids)


def lora_reference(x: Tensor, a: list[Tensor | None], b: list[Tensor | None]) -> Tensor:
    """Per-token reference for tests: ``x[T, in]`` with token t's adapter ``a[t] [r, in]``, ``b[t] [r, out]``.

    Semantics::

        for t in range(T):
            out[t] = (x[t] @ a[t].T) @ b[t]  if a[t] is not None else 0
    """
    out_dim = next(bt.shape[-1] for bt in b if bt is not None)
    out = x.new_zeros(x.shape[0], out_dim)
    for t in range(x.shape[0]):
        if a[t] is not None:
            out[t] = (x[t] @ a[t].T) @ b[t]
    return out
