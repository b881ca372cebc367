"""The batched LoRA ops against their "Semantics:" loops, the per-step block layout and the row pool."""

from __future__ import annotations

import pytest
import torch

from hotswap.serve.lora import ops
from hotswap.serve.lora.batch import build_lora_step, choose_block_len
from hotswap.serve.lora.pool import GROUPS, LoraPool
from hotswap.serve.lora.spec import LoraSpec
from hotswap.serve.lora.weights import HostAdapter

from .kernel_support import kernel_case, native_kernels

DIMS = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
        "gate_proj": (16, 24), "up_proj": (16, 24), "down_proj": (24, 16)}


def random_adapter(ranks: dict[str, int], layers: int = 2, seed: int = 0, scale: float = 0.5,
                   dtype: torch.dtype = torch.float32) -> HostAdapter:
    """Host weights as the loader hands them out: per (layer, module) A [r, in] and B [out, r]."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(layer, m) for m in ranks for layer in range(layers)]
    a = {(layer, m): torch.randn(ranks[m], DIMS[m][0], generator=g).to(dtype) for layer, m in pairs}
    b = {(layer, m): torch.randn(DIMS[m][1], ranks[m], generator=g).to(dtype) for layer, m in pairs}
    spec = LoraSpec(ranks={p: ranks[p[1]] for p in pairs}, scales={p: scale for p in pairs}, keys={})
    return HostAdapter(digest=f"d{seed}", ref=f"a{seed}", spec=spec, buffer=torch.empty(0, dtype=torch.uint8),
                       a=a, b=b, ranks=dict(ranks))


def test_shrink_expand_follow_their_semantics_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    a_stacked, b_stacked = torch.randn(9, 16, generator=g), torch.randn(9, 12, generator=g)
    token_index = torch.tensor([0, 1, 2, 3, 4, 4])  # 3 blocks of 2, the last padded
    rows = torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]])
    xb = ops.gather_blocks(x, token_index, 3, 2)
    h = ops.shrink(xb, ops.gather_rows(a_stacked, rows))
    y = torch.zeros(5, 12)
    ops.scatter_add(y, ops.expand(h, ops.gather_rows(b_stacked, rows)), torch.tensor([0, 1, 2, 3, 4]), None)
    ref_h = torch.zeros(3, 2, 3)
    for b in range(3):
        for j in range(3):
            ref_h[b, :, j] = xb[b] @ a_stacked[rows[b, j]]
    assert torch.allclose(h, ref_h, atol=1e-5)
    block_of = [0, 0, 1, 1, 2]
    ref_y = torch.stack([sum(h[block_of[t], t % 2, j] * b_stacked[rows[block_of[t], j]] for j in range(3))
                         for t in range(5)])
    assert torch.allclose(y, ref_y, atol=1e-5)


def test_pool_and_step_rows_reproduce_per_token_lora():
    pool = LoraPool(2, DIMS, max_rows=12, dtype=torch.float32, device=torch.device("cpu"))
    adapters = [random_adapter({"q_proj": 4, "v_proj": 4}, seed=1),
                random_adapter({m: 2 for m in DIMS}, seed=2),
                random_adapter({"k_proj": 6, "down_proj": 3}, seed=3)]
    slots = [pool.activate(a) for a in adapters]
    # tokens: seq0 (adapter 0) 3 tokens, seq1 base 2 tokens, seq2 (adapter 2) 1 token, seq3 (adapter 1) 4 tokens
    segments = [(0, 3, slots[0]), (3, 2, -1), (5, 1, slots[2]), (6, 4, slots[1])]
    owner = [0, 0, 0, None, None, 2, 1, 1, 1, 1]
    step = build_lora_step(segments, 10, pool, torch.device("cpu"), cache_bytes=1 << 20)
    k = step.rank
    for group, modules in GROUPS.items():  # rows kept for every layer == gathered per layer
        assert torch.equal(step.gathered.a[group][1], ops.gather_rows(pool.a_stacked[group][1], step.rows[group]))
        diag, start = step.gathered.b[group][1], 0  # B block-diagonal: module i's rows in its own columns only
        assert diag.shape == (step.num_blocks, len(modules) * k, sum(DIMS[m][1] for m in modules))
        for i, m in enumerate(modules):
            out = DIMS[m][1]
            expected = torch.zeros(step.num_blocks, len(modules) * k, out)
            expected[:, i * k:(i + 1) * k] = ops.gather_rows(pool.b_stacked[m][1], step.rows[m])
            assert torch.equal(diag[..., start:start + out], expected)
            start += out
    assert build_lora_step(segments, 10, pool, torch.device("cpu"), cache_bytes=1 << 20).gathered is step.gathered
    x = torch.randn(10, 16)
    for group, modules in GROUPS.items():
        if group != "qkv":
            continue
        layer = 1
        xb = ops.gather_blocks(x, step.token_index, step.num_blocks, step.block_len)
        h = ops.shrink(xb, ops.gather_rows(pool.a_stacked[group][layer], step.rows[group]))
        for i, m in enumerate(modules):
            y = torch.zeros(10, DIMS[m][1])
            k = step.rank
            ops.scatter_add(y, ops.expand(h[..., i * k:(i + 1) * k], ops.gather_rows(pool.b_stacked[m][layer], step.rows[m])),
                            step.block_pos, step.token_ids)
            a_t = [adapters[o].a.get((layer, m)) if o is not None else None for o in owner]
            b_t = [adapters[o].b[(layer, m)].T * 0.5 if a_t[t] is not None else None for t, o in enumerate(owner)]
            a_t = [a if a is not None else torch.zeros(1, DIMS[m][0]) for a in a_t]
            b_t = [b if b is not None else torch.zeros(1, DIMS[m][1]) for b in b_t]
            assert torch.allclose(y, ops.lora_reference(x, a_t, b_t), atol=1e-5), m
        # the kept rows give the same sums in two products: down, then block-diagonal up
        y_group = torch.zeros(10, sum(DIMS[m][1] for m in modules))
        ops.expand_scatter_add(y_group, ops.shrink(xb, step.gathered.a[group][layer]), step.gathered.b[group][layer],
                               step.block_pos, step.token_ids)
        per_module = [torch.zeros(10, DIMS[m][1]) for m in modules]
        for i, (m, y) in enumerate(zip(modules, per_module)):
            ops.scatter_add(y, ops.expand(h[..., i * k:(i + 1) * k], ops.gather_rows(pool.b_stacked[m][layer], step.rows[m])),
                            step.block_pos, step.token_ids)
        assert torch.allclose(y_group, torch.cat(per_module, dim=-1), atol=1e-5)


def test_kept_rows_expand_in_place_when_every_token_has_an_adapter():
    pool = LoraPool(1, DIMS, max_rows=8, dtype=torch.float32, device=torch.device("cpu"))
    adapters = [random_adapter({"gate_proj": 3, "up_proj": 2}, layers=1, seed=4),
                random_adapter({"up_proj": 4}, layers=1, seed=5)]
    slots = [pool.activate(a) for a in adapters]
    step = build_lora_step([(0, 1, slots[0]), (1, 1, slots[1]), (2, 1, slots[0])], 3, pool, torch.device("cpu"),
                           cache_bytes=1 << 20)
    assert step.block_pos is None and step.token_ids is None and step.gathered is not None
    x, y = torch.randn(3, 16), torch.randn(3, sum(DIMS[m][1] for m in GROUPS["gate_up"]))
    expected = y.clone()
    start = 0
    for m in GROUPS["gate_up"]:
        a_t = [adapters[o].a.get((0, m)) for o in (0, 1, 0)]
        b_t = [adapters[o].b[(0, m)].T * 0.5 if a is not None else None for o, a in zip((0, 1, 0), a_t)]
        a_t = [a if a is not None else torch.zeros(1, 16) for a in a_t]
        b_t = [b if b is not None else torch.zeros(1, DIMS[m][1]) for b in b_t]
        expected[:, start:start + DIMS[m][1]] += ops.lora_reference(x, a_t, b_t)
        start += DIMS[m][1]
    h = ops.shrink(ops.gather_blocks(x, None, 3, 1), step.gathered.a["gate_up"][0])
    ops.expand_scatter_add(y, h, step.gathered.b["gate_up"][0], None, None)
    assert torch.allclose(y, expected, atol=1e-5)


def test_no_adapter_in_step_means_no_lora_and_decode_is_identity():
    pool = LoraPool(1, DIMS, max_rows=4, dtype=torch.float32, device=torch.device("cpu"))
    assert build_lora_step([(0, 3, -1), (3, 1, -1)], 4, pool, torch.device("cpu")) is None
    slot = pool.activate(random_adapter({"q_proj": 2}, layers=1))
    step = build_lora_step([(0, 1, slot), (1, 1, slot)], 2, pool, torch.device("cpu"))
    assert step.block_len == 1 and step.token_index is None and step.block_pos is None and step.token_ids is None
    assert step.rows["q_proj"].tolist() == [pool.slot(slot).rows["q_proj"]] * 2
    assert step.rows["k_proj"].tolist() == [[0, 0], [0, 0]]  # untargeted module: the zero row


def test_block_length_balances_padding_and_gathers():
    assert choose_block_len([1] * 8) == 1
    assert choose_block_len([64] * 8) == 64
    assert choose_block_len([64, 1, 1, 1, 1, 1, 1, 1]) in (8, 16, 32)


def test_pool_rows_are_reused_and_counted_in_bytes():
    pool = LoraPool(2, DIMS, max_rows=6, dtype=torch.float32, device=torch.device("cpu"))
    big = random_adapter({m: 4 for m in DIMS}, seed=1)
    small = random_adapter({"q_proj": 2, "down_proj": 2}, seed=2)
    s1, s2 = pool.activate(big), pool.activate(small)
    assert pool.used_bytes == sum(pool.row_bytes(m) * r for m, r in (*((m, 4) for m in DIMS), ("q_proj", 2), ("down_proj", 2)))
    assert not pool.fits_now(random_adapter({"q_proj": 1}, seed=3))
    assert pool.fits_now(random_adapter({"k_proj": 2}, seed=3))
    pool.release(s1)
    third = random_adapter({"q_proj": 4}, seed=4)
    s3 = pool.activate(third)
    a_view, _ = pool.module_view("q_proj", 1)
    assert torch.equal(a_view[pool.slot(s3).rows["q_proj"]], third.a[(1, "q_proj")])
    assert torch.equal(a_view[pool.slot(s2).rows["q_proj"]], small.a[(1, "q_proj")])
    assert not a_view[0].any()  # the zero row stays zero
    assert LoraPool.rows_for_bytes(pool.capacity_bytes, 2, DIMS, torch.float32) == 6


def test_scattered_rows_and_partial_layers_overwrite_stale_rows():
    pool = LoraPool(2, DIMS, max_rows=8, dtype=torch.float32, device=torch.device("cpu"))
    first, middle, last = (pool.activate(random_adapter({"q_proj": 2}, seed=s)) for s in (1, 2, 3))
    pool.release(middle)  # rows 3, 4 keep the old values
    layer0_only = random_adapter({"q_proj": 3}, layers=2, seed=4)
    del layer0_only.a[(1, "q_proj")], layer0_only.b[(1, "q_proj")]
    slot = pool.activate(layer0_only)
    rows = pool.slot(slot).rows["q_proj"]
    assert rows != list(range(rows[0], rows[0] + 3))  # not a run: the scattered-row path
    a0, b0 = pool.module_view("q_proj", 0)
    a1, b1 = pool.module_view("q_proj", 1)
    assert torch.equal(a0[rows], layer0_only.a[(0, "q_proj")])
    assert torch.allclose(b0[rows], layer0_only.b[(0, "q_proj")].T * 0.5)
    assert not a1[rows].any() and not b1[rows].any()  # the untargeted layer reads zeros, not the old adapter


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("pool_dtype, file_dtype", [(F32, F32), (BF16, F32), (BF16, BF16), (F32, BF16)])
def test_native_activation_writes_the_same_rows_as_the_torch_path(pool_dtype, file_dtype):
    """``activate.c``: A rows copied, B transposed and scaled, stale rows of unused ranks and
    untargeted layers zeroed; the same sequence of activations on both paths gives equal pools,
    bfloat16 pools rounded as torch rounds (the scale applied in float32 first)."""
    pools = []
    for kernels in (None, native_kernels()):
        pool = LoraPool(2, DIMS, max_rows=8, dtype=pool_dtype, device=torch.device("cpu"), compute_dtype=F32)
        pool.kernels = kernels
        slots = [pool.activate(random_adapter({m: 3 for m in DIMS}, seed=1, scale=0.3, dtype=file_dtype)),
                 pool.activate(random_adapter({"q_proj": 2, "down_proj": 4}, seed=2, dtype=file_dtype))]
        pool.release(slots[0])  # its rows keep stale values for the next owners
        partial = random_adapter({"q_proj": 4, "gate_proj": 2, "v_proj": 1}, seed=3, scale=0.25, dtype=file_dtype)
        del partial.a[(1, "gate_proj")], partial.b[(1, "gate_proj")]  # layer 1 has no gate_proj
        pools.append((pool, pool.activate(partial)))
    (torch_pool, _), (native_pool, slot) = pools
    for group in GROUPS:
        assert torch.equal(torch_pool.a_stacked[group], native_pool.a_stacked[group]), group
    for m in DIMS:
        assert torch.equal(torch_pool.b_stacked[m], native_pool.b_stacked[m]), m
    assert not native_pool.module_view("gate_proj", 1)[1][native_pool.slot(slot).rows["gate_proj"]].any()


def test_expand_add_accumulates_into_column_views():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2 * 4, 10, generator=g)
    h, b = torch.randn(2, 4, 3, generator=g), torch.randn(2, 3, 6, generator=g)
    expected = y.clone()
    for blk in range(2):
        for j in range(3):
            expected.view(2, 4, 10)[blk, :, 2:8] += h[blk, :, j:j + 1] * b[blk, j]
    ops.expand_add(y.view(2, 4, 10)[..., 2:8], h, b)
    assert torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("adapter_of_token, tok, num_tokens", [
    ([0, 2, 1], [4, 0, 2], 5),  # a decode step: 3 adapter tokens of 5, out of order (few: columns split)
    ([0, 1, 2, 0, 1, 2, 1, 0], None, 8),  # decode, every token, different neighbours
    ([1] * 9 + [0] * 2 + [2] * 6 + [1], None, 18),  # prefill runs: blocks of 4, 3, 2 and 1 tokens
    ([2] * 7 + [0] * 5, list(range(3, 15)), 16),  # prefill runs beside base tokens
])
def test_native_kernel_follows_its_semantics(adapter_of_token, tok, num_tokens):
    """``bgmv.c``: per adapter token, shrink through its A rows and add each module's expand into
    its columns of y; runs of one adapter share row reads; other tokens untouched; row 0 pads."""
    from hotswap.serve.lora.native import PoolLayers

    x, y0, ref, a_pool, b_pools, rows_a, rows_b = kernel_case(adapter_of_token, tok, num_tokens, seed=3)
    y = y0.clone()
    call = native_kernels().group_call(PoolLayers([a_pool], [b_pools]), rows_a, rows_b,
                                None if tok is None else torch.tensor(tok), torch.empty(rows_a.numel()), num_tokens)
    call(0, x, y)
    assert torch.allclose(y, ref, atol=1e-4)
    untouched = sorted(set(range(num_tokens)) - set(tok if tok is not None else range(len(adapter_of_token))))
    assert torch.equal(y[untouched], y0[untouched])


def test_kernel_steps_read_rows_from_the_pools_and_keep_them_across_decode_steps():
    pool = LoraPool(2, DIMS, max_rows=12, dtype=torch.float32, device=torch.device("cpu"))
    slots = [pool.activate(random_adapter({"q_proj": 4, "v_proj": 4}, seed=1)),
             pool.activate(random_adapter({m: 2 for m in DIMS}, seed=2))]
    decode = build_lora_step([(0, 1, slots[0]), (1, 1, -1), (2, 1, slots[1])], 3, pool, torch.device("cpu"),
                             cache_bytes=1 << 20, kernel=True)
    assert decode.gathered is None and decode.kernel_tok.tolist() == [0, 2]
    rows_a, rows_b = decode.kernel_rows["qkv"]
    assert rows_b.shape == (3, 2, decode.rank) and rows_a.shape == (2, 3 * decode.rank)
    assert rows_b[0, 0, :4].tolist() == pool.slot(slots[0]).rows["q_proj"] and rows_b[1, 0].tolist() == [0] * 4
    again = build_lora_step([(0, 1, slots[0]), (1, 1, -1), (2, 1, slots[1])], 3, pool, torch.device("cpu"),
                            kernel=True)
    assert again is decode  # same blocks at the same tokens: the step is not rebuilt
    moved = build_lora_step([(0, 1, -1), (1, 1, slots[0]), (2, 1, slots[1])], 3, pool, torch.device("cpu"),
                            kernel=True)
    assert moved is not decode and moved.kernel_tok.tolist() == [1, 2]  # same slots, other tokens
    prefill = build_lora_step([(0, 3, slots[1]), (3, 2, -1), (5, 2, slots[0])], 7, pool, torch.device("cpu"),
                              kernel=True)
    rows_a, rows_b = prefill.kernel_rows["gate_up"]  # every adapter token carries its sequence's rows
    assert rows_b.shape == (2, 5, prefill.rank) and rows_a.shape == (5, 2 * prefill.rank)
    assert rows_b[0, :3, :2].tolist() == [pool.slot(slots[1]).rows["gate_proj"]] * 3
    assert rows_b[0, 3:].tolist() == [[0] * prefill.rank] * 2  # slot 0 has no gate_proj
    assert prefill.kernel_tok.tolist() == [0, 1, 2, 5, 6] and prefill.scratch.numel() >= 5 * 3 * prefill.rank


def test_kernel_calls_refuse_inputs_that_do_not_match_their_pools():
    """The kernel reads raw pointers: a wrong shape, dtype or layout is an error, never a stray read or write."""
    from hotswap.serve.lora.native import PoolLayers

    x, y0, _, a_pool, b_pools, rows_a, rows_b = kernel_case([0, 1], None, 2, seed=4)
    call = native_kernels().group_call(PoolLayers([a_pool], [b_pools]), rows_a, rows_b, None, torch.empty(rows_a.numel()), 2)
    for bad_x, bad_y in [(x[:, :-1], y0), (x, y0[:, 1:]), (x[:1], y0), (x.double(), y0), (x, y0.t().contiguous().t())]:
        y = y0.clone()
        with pytest.raises(ValueError, match="LoRA kernel inputs"):
            call(0, bad_x, bad_y if bad_y is not y0 else y)
    with pytest.raises(ValueError, match="outside the pools"):
        native_kernels().group_call(PoolLayers([a_pool], [b_pools]), rows_a + a_pool.shape[0], rows_b, None,
                             torch.empty(rows_a.numel()), 2)
