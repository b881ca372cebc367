"""GPU LoRA for decode steps: Triton kernels that read each token's adapter rows in place.

Why: the torch path gathers every token's rows out of the pools into a copy, then multiplies the
copy (``ops.gather_rows`` + ``bmm``). On a GPU that copy is written and read again every layer: for
a 1B base at batch 32 with rank-16 adapters on all linear modules, about 1.4 GB of traffic a step
beside the rows' own 0.7 GB and the base's 2.5 GB. These kernels do what Punica's BGMV does: each
program reads one token's rows straight from the pools (rows of tokens that share an adapter come
from the GPU's cache) and accumulates in float32.

Kernels exist only where Triton does (torch's CUDA builds ship it). ``load`` compiles them and
checks them against the torch path on a small problem before the engine uses them; if either
fails, decode steps keep the torch path and the log says why. With ``TRITON_INTERPRET=1`` the
same kernels run on the CPU in Triton's interpreter: the tests check them there.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from . import ops

try:  # the kernels' language, resolved when they compile; without Triton ``load`` returns None
    import triton.language as tl
    _UNUSABLE = None
except Exception as exc:  # not installed, or an install that fails to import (built for another torch or CUDA):
    tl, _UNUSABLE = None, f"{type(exc).__name__}: {exc}"  # the engine must still import and serve

log = logging.getLogger("hotswap.engine")

# Tile sizes. A decode step's LoRA is a few small products per layer, so what costs is latency: no
# program walks a long loop. The shrink splits the input features over programs, each writing a
# partial sum; the expand adds the partials in a fixed order (no atomics: a greedy run repeats
# itself bit for bit) before it multiplies by B.
_TILE = 8192  # elements of the A or B tile one program holds: 32 a thread in 8 warps
_WARPS = 8
_MAX_COLS = 64  # shrink: rank columns per program, at most


def _shrink_kernel(x_ptr, tok_ptr, a_ptr, rows_ptr, part_ptr, in_dim, num_cols, num_splits, x_stride, a_stride,
                   HAS_TOK: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_IN: tl.constexpr):
    """part[b, s, c] = x[tok[b], s-th chunk] . a[rows[b, c], s-th chunk], for block b (program axis 0),
    input chunk s (axis 1) and rank columns c (axis 2)."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < num_cols
    t = tl.load(tok_ptr + b) if HAS_TOK else b
    rows = tl.load(rows_ptr + b * num_cols + cols, mask=col_ok, other=0)
    feats = split * BLOCK_IN + tl.arange(0, BLOCK_IN)
    feat_ok = feats < in_dim
    xv = tl.load(x_ptr + t * x_stride + feats, mask=feat_ok, other=0.0).to(tl.float32)
    av = tl.load(a_ptr + rows[:, None] * a_stride + feats[None, :], mask=col_ok[:, None] & feat_ok[None, :],
                 other=0.0).to(tl.float32)
    tl.store(part_ptr + (b * num_splits + split) * num_cols + cols, tl.sum(av * xv[None, :], axis=1), mask=col_ok)


def _expand_kernel(part_ptr, tok_ptr, b_ptr, rows_ptr, y_ptr, out_dim, rank, num_cols, num_splits, col0, b_stride,
                   y_stride, y_col0, HAS_TOK: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                   BLOCK_OUT: tl.constexpr):
    """y[tok[b], y_col0 + n] += sum_j h[b, j] * b[rows[b, j], n] with h[b, j] = sum_s part[b, s, col0 + j],
    for block b (axis 0) and output features n (axis 1): each (token, feature) is written by one
    program, so no atomics."""
    b = tl.program_id(0)
    outs = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = outs < out_dim
    ranks = tl.arange(0, BLOCK_RANK)
    rank_ok = ranks < rank
    splits = tl.arange(0, BLOCK_SPLITS)
    t = tl.load(tok_ptr + b) if HAS_TOK else b
    rows = tl.load(rows_ptr + b * rank + ranks, mask=rank_ok, other=0)
    parts = tl.load(part_ptr + (b * num_splits + splits[:, None]) * num_cols + col0 + ranks[None, :],
                    mask=(splits[:, None] < num_splits) & rank_ok[None, :], other=0.0)
    hv = tl.sum(parts, axis=0)
    bv = tl.load(b_ptr + rows[:, None] * b_stride + outs[None, :], mask=rank_ok[:, None] & out_ok[None, :],
                 other=0.0).to(tl.float32)
    delta = tl.sum(bv * hv[:, None], axis=0)
    y_at = y_ptr + t * y_stride + y_col0 + outs
    yv = tl.load(y_at, mask=out_ok, other=0.0)
    tl.store(y_at, (yv.to(tl.float32) + delta).to(yv.dtype), mask=out_ok)


class TritonLora:
    """A decode step's LoRA for one projection group, from the pools in place (see module doc)."""

    def __init__(self) -> None:
        import triton

        # jit here, not at import: Triton reads TRITON_INTERPRET when it wraps a function
        self._shrink = triton.jit(_shrink_kernel)
        self._expand = triton.jit(_expand_kernel)
        self._next_pow2 = triton.next_power_of_2

    def add(self, y: Tensor, x: Tensor, a_pool: Tensor, a_rows: Tensor, b_pools: list[Tensor],
            b_rows: list[Tensor], rank: int, tok: Tensor | None = None) -> None:
        """``y[tok[b]] += sum_i (x[tok[b]] @ a_pool[a_rows[b]].T)[i*rank:(i+1)*rank] @ b_pools[i][b_rows[i][b]]``
        in place, for NB = ``a_rows.shape[0]`` blocks of one token (``tok`` None: block b is token b).

        ``y`` is ``[T, sum of outs]`` (the group's modules side by side), ``x`` ``[T, in]``; the pools are
        ``[rows, in]`` and ``[rows, out]`` (contiguous), the rows ``[NB, len(b_pools) * rank]`` and ``[NB, rank]``.
        """
        num_blocks, num_cols = a_rows.shape
        if num_blocks == 0:
            return
        assert x.stride(1) == 1 and y.stride(1) == 1 and a_pool.is_contiguous(), "rows must be contiguous"
        p2 = self._next_pow2
        block_cols = min(p2(num_cols), _MAX_COLS)
        block_in = min(_TILE // block_cols, p2(x.shape[1]))
        num_splits = -(-x.shape[1] // block_in)
        parts = torch.empty(num_blocks, num_splits, num_cols, dtype=torch.float32, device=x.device)
        tok_arg = a_rows if tok is None else tok  # any tensor: the kernel does not read it without HAS_TOK
        grid = (num_blocks, num_splits, -(-num_cols // block_cols))
        self._shrink[grid](x, tok_arg, a_pool, a_rows.contiguous(), parts, x.shape[1], num_cols, num_splits,
                           x.stride(0), a_pool.stride(0), HAS_TOK=tok is not None, BLOCK_COLS=block_cols,
                           BLOCK_IN=block_in, num_warps=_WARPS)
        block_rank = p2(rank)
        col = 0
        for i, (pool, rows) in enumerate(zip(b_pools, b_rows)):
            assert pool.is_contiguous(), "rows must be contiguous"
            out_dim = pool.shape[1]
            block_out = min(_TILE // block_rank, p2(out_dim))
            grid = (num_blocks, -(-out_dim // block_out))
            self._expand[grid](parts, tok_arg, pool, rows.contiguous(), y, out_dim, rank, num_cols, num_splits,
                               i * rank, pool.stride(0), y.stride(0), col, HAS_TOK=tok is not None,
                               BLOCK_RANK=block_rank, BLOCK_SPLITS=p2(num_splits), BLOCK_OUT=block_out,
                               num_warps=_WARPS)
            col += out_dim


def load(device: torch.device, dtype: torch.dtype) -> TritonLora | None:
    """The kernels, compiled and checked on ``device`` against the torch path; None (and a log line
    saying why) when Triton is missing, they do not build, or their results differ."""
    if tl is None:  # torch's CUDA builds ship Triton; its CPU builds do not
        log.info("triton does not import here (%s): decode steps gather adapter rows with torch", _UNUSABLE)
        return None
    try:
        kernels = TritonLora()
        error = check(kernels, device, dtype)
    except Exception as exc:  # a compiler or driver refusal: the torch path still serves
        log.warning("the Triton LoRA kernels do not run here (%s: %s); decode steps gather adapter rows with torch",
                    type(exc).__name__, exc)
        return None
    if error is not None:
        log.warning("the Triton LoRA kernels disagree with the torch path (%s); decode steps gather adapter rows "
                    "with torch", error)
        return None
    return kernels


def check(kernels: TritonLora, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run ``kernels`` on a small random problem (3 modules, rank 8, rows shared and padded, a token
    without adapter) against gather + bmm; None when they agree, else what differed."""
    gen = torch.Generator().manual_seed(0)
    rank, in_dim, outs, num_rows, tokens = 8, 80, (48, 16, 136), 40, 5

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)
    a_pool = rand(len(outs) * num_rows, in_dim)
    b_pools = [rand(num_rows, out) for out in outs]
    picks = torch.randint(1, num_rows, (tokens, rank), generator=gen)
    picks[1] = picks[0]  # two tokens of one adapter
    picks[2, rank // 2:] = 0  # a lower rank, padded with row 0
    b_rows = [picks.to(device) for _ in outs]
    a_rows = torch.cat([picks + i * num_rows for i in range(len(outs))], dim=1).to(device)
    x, y = rand(tokens + 1, in_dim), rand(tokens + 1, sum(outs))
    tok = torch.tensor([0, 2, 3, 4, 5], device=device)  # token 1 uses no adapter
    want = y.float().clone()
    h = ops.shrink(x.float()[tok][:, None], ops.gather_rows(a_pool.float(), a_rows))
    delta = torch.cat([ops.expand(h[..., i * rank:(i + 1) * rank], ops.gather_rows(p.float(), r))
                       for i, (p, r) in enumerate(zip(b_pools, b_rows))], dim=-1)
    want[tok] += delta[:, 0]
    kernels.add(y, x, a_pool, a_rows, b_pools, b_rows, rank, tok)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    err = ((y.float() - want).abs() / (1 + want.abs())).max().item()
    return None if err <= tolerance else f"largest relative difference {err:.3g}"
