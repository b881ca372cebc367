"""The native CPU kernels and reference cases for their tests."""

from __future__ import annotations

import torch


def native_kernels():
    from hotswap.serve.lora import native

    kernel = native.load()
    assert kernel is not None, "the native kernel did not build (is a C compiler installed?)"
    return kernel


def kernel_case(adapter_of_token: list[int], tok: list[int] | None, num_tokens: int, seed: int):
    """Pools for 3 modules of widths off and on the 16-column tile, adapters of rank 3 and 5 (padded
    to k=5 with the zero row), and the reference output of ``bgmv.c``'s semantics, token by token."""
    g = torch.Generator().manual_seed(seed)
    din, douts, k, rows_per = 40, [24, 130, 64], 5, 12
    a_pool = torch.randn(len(douts) * rows_per, din, generator=g)
    b_pools = [torch.randn(rows_per, d, generator=g) for d in douts]
    for i in range(len(douts)):
        a_pool[i * rows_per] = 0
    for b in b_pools:
        b[0] = 0
    adapter_rows = [[1, 2, 3, 0, 0], [6, 7, 8, 9, 10], [11, 4, 5, 0, 0]]  # rank 3, 5, 3
    rows_b = torch.tensor([[adapter_rows[a] for a in adapter_of_token]] * len(douts))
    rows_a = torch.cat([rows_b[i] + i * rows_per for i in range(len(douts))], dim=1)  # padding: zero rows too
    x = torch.randn(num_tokens, din, generator=g)
    y0 = torch.randn(num_tokens, sum(douts), generator=g)
    ref = y0.clone()
    for i, t in enumerate(tok if tok is not None else range(len(adapter_of_token))):
        h = torch.stack([x[t] @ a_pool[r] for r in rows_a[i].tolist()])
        col = 0
        for m, d in enumerate(douts):
            ref[t, col:col + d] += sum(h[m * k + j] * b_pools[m][rows_b[m, i, j]] for j in range(k))
            col += d
    return x, y0, ref, a_pool, b_pools, rows_a, rows_b
