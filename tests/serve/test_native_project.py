"""``hotswap_project`` in ``bgmv.c``: a decode step's base projection, alone or with the step's LoRA
added in the same pass."""

from __future__ import annotations

import pytest
import torch

from hotswap.serve.lora.native import BaseLayers, PoolLayers

from .kernel_support import kernel_case, native_kernels


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 5, 6, 9, 24])
@pytest.mark.parametrize("din, douts", [(40, (24, 130, 64)), (13, (7, 33))])  # off the 8-float vector and row pairs
def test_native_projection_is_the_matmul(num_tokens, din, douts):
    g = torch.Generator().manual_seed(num_tokens)
    weights = [torch.randn(sum(douts), din, generator=g) for _ in range(2)]
    x = torch.randn(num_tokens, din, generator=g)
    base = BaseLayers(weights, douts)
    for layer, w in enumerate(weights):  # each layer reads its own weight
        assert torch.allclose(native_kernels().project(base, layer, x), x @ w.T, atol=1e-4)


@pytest.mark.parametrize("adapter_of_token, tok, num_tokens", [
    ([0, 2, 1], [4, 0, 2], 5),  # 3 adapter tokens of 5, out of order; the others get the base alone
    ([0, 1, 2, 0, 1, 2, 1, 0], None, 8),  # every token, different neighbours
    ([1] * 9 + [0] * 2 + [2] * 6 + [1], None, 18),  # runs of one adapter (a short prefill)
    ([], None, 3),  # no adapter token
])
def test_fused_projection_adds_each_tokens_lora_to_the_base(adapter_of_token, tok, num_tokens):
    x, y0, ref, a_pool, b_pools, rows_a, rows_b = kernel_case(adapter_of_token, tok, num_tokens, seed=5)
    if not adapter_of_token:
        rows_a, rows_b = torch.zeros(0, 15, dtype=torch.long), torch.zeros(3, 0, 5, dtype=torch.long)
    douts = tuple(b.shape[1] for b in b_pools)
    w = torch.randn(sum(douts), x.shape[1], generator=torch.Generator().manual_seed(6))
    call = native_kernels().group_call(PoolLayers([a_pool], [b_pools]), rows_a, rows_b,
                                       None if tok is None else torch.tensor(tok), torch.empty(max(1, rows_a.numel())),
                                       num_tokens)
    y = call.project(BaseLayers([w], douts), 0, x)
    assert torch.allclose(y, x @ w.T + (ref - y0), atol=1e-4)


def test_a_lora_call_without_adapter_tokens_changes_nothing():
    x, y0, _ref, a_pool, b_pools, _, _ = kernel_case([], None, 3, seed=7)
    rows_a, rows_b = torch.zeros(0, 15, dtype=torch.long), torch.zeros(3, 0, 5, dtype=torch.long)
    call = native_kernels().group_call(PoolLayers([a_pool], [b_pools]), rows_a, rows_b, None, torch.empty(1), 3)
    y = y0.clone()
    call(0, x, y)
    assert torch.equal(y, y0)


def test_projections_refuse_inputs_that_do_not_fit():
    """Raw pointers again: a wrong width, dtype, layout or module split is an error, never a stray read."""
    x, _, _, a_pool, b_pools, rows_a, rows_b = kernel_case([0, 1], None, 2, seed=7)
    douts = tuple(b.shape[1] for b in b_pools)
    base = BaseLayers([torch.randn(sum(douts), x.shape[1])], douts)
    kernels = native_kernels()
    call = kernels.group_call(PoolLayers([a_pool], [b_pools]), rows_a, rows_b, None, torch.empty(rows_a.numel()), 2)
    for bad in (x[:, :-1], x.double(), x.t().contiguous().t(), x[None]):
        with pytest.raises(ValueError, match="projection input"):
            kernels.project(base, 0, bad)
    with pytest.raises(ValueError, match="fused projection"):
        call.project(base, 0, x[:1])  # not the step's tokens
    other = BaseLayers([torch.randn(sum(douts), x.shape[1])], (douts[0] + douts[1], douts[2]))
    with pytest.raises(ValueError, match="fused projection"):
        call.project(other, 0, x)  # the same width split into other modules
    with pytest.raises(ValueError, match="projection input"):
        call.project(base, 0, x.double())
