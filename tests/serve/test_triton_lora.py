"""The GPU decode LoRA kernels (serve/lora/triton_ops.py), run in Triton's CPU interpreter: against
the torch path's gather + bmm, and inside the engine against PEFT."""

from __future__ import annotations

import logging

import pytest
import torch

from hotswap.serve.lora import ops, triton_ops

from .engine_support import ADAPTERS, peft_rows, preload, prompt_requests, start_engine, world  # noqa: F401

pytest.importorskip("triton", reason="Triton ships with torch's CUDA builds; on the CPU the tests install it")


# on a GPU the kernels compile; elsewhere tests/conftest.py has Triton interpret them on the CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(y, x, a_pool, a_rows, b_pools, b_rows, rank, tok):
    """What ``TritonLora.add`` adds, from the torch path's ops, in float32."""
    tok = torch.arange(a_rows.shape[0], device=x.device) if tok is None else tok
    h = ops.shrink(x.float()[tok][:, None], ops.gather_rows(a_pool.float(), a_rows))
    delta = torch.cat([ops.expand(h[..., i * rank:(i + 1) * rank], ops.gather_rows(p.float(), r))
                       for i, (p, r) in enumerate(zip(b_pools, b_rows))], dim=-1)
    out = y.float().clone()
    out[tok] += delta[:, 0]
    return out


@pytest.mark.parametrize("rank, outs, rows_dtype, with_tok", [
    (1, (200,), torch.float32, False),
    (3, (64, 32, 32), torch.float32, True),  # three modules side by side, as q, k and v
    (16, (300, 300), torch.bfloat16, True),  # rows held in bfloat16 under a float32 base
    (24, (129,), torch.float32, False),  # a rank that is no power of two
])
def test_kernels_match_gather_and_bmm(rank, outs, rows_dtype, with_tok):
    gen = torch.Generator().manual_seed(rank)
    in_dim, num_rows, blocks = 200, 64, 6
    a_pool = torch.randn(len(outs) * num_rows, in_dim, generator=gen).to(DEVICE, rows_dtype)
    b_pools = [torch.randn(num_rows, out, generator=gen).to(DEVICE, rows_dtype) for out in outs]
    picks = torch.randint(0, num_rows, (blocks, rank), generator=gen)
    picks[3] = picks[1]  # blocks of one adapter read the same rows
    b_rows = [picks.to(DEVICE) for _ in outs]
    a_rows = torch.cat([picks + i * num_rows for i in range(len(outs))], dim=1).to(DEVICE)
    tokens = blocks + 2 if with_tok else blocks
    x = torch.randn(tokens, in_dim, generator=gen).to(DEVICE)
    y = torch.randn(tokens, sum(outs), generator=gen).to(DEVICE)
    tok = torch.tensor([7, 0, 2, 3, 5, 6], device=DEVICE) if with_tok else None  # tokens 1 and 4: no adapter
    want = reference(y, x, a_pool, a_rows, b_pools, b_rows, rank, tok)
    triton_ops.TritonLora().add(y, x, a_pool, a_rows, b_pools, b_rows, rank, tok)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-3)


# the anchors' 1B Llama: hidden 2048, k/v 512, intermediate 8192, vocabulary 128256 (lm_head's LoRA
# adds into float32 logits); the interpreter takes minutes here, a GPU compiles them in seconds
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("in_dim, outs, rank, tokens, y_dtype", [
    (2048, (2048, 512, 512), 16, 32, torch.bfloat16),  # q, k, v of a batch of 32
    (2048, (8192, 8192), 64, 3, torch.bfloat16),  # gate, up at the highest rank
    (8192, (2048,), 8, 1, torch.bfloat16),  # down
    (2048, (128256,), 16, 32, torch.float32),  # lm_head
], ids=["qkv", "gate_up", "down", "lm_head"])
def test_kernels_at_the_1b_shape_on_the_gpu(in_dim, outs, rank, tokens, y_dtype):
    gen = torch.Generator().manual_seed(rank)
    num_rows = 40
    a_pool = (0.05 * torch.randn(len(outs) * num_rows, in_dim, generator=gen)).to(DEVICE, torch.bfloat16)
    b_pools = [(0.05 * torch.randn(num_rows, out, generator=gen)).to(DEVICE, torch.bfloat16) for out in outs]
    picks = torch.randint(0, num_rows, (tokens, rank), generator=gen)
    b_rows = [picks.to(DEVICE) for _ in outs]
    a_rows = torch.cat([picks + i * num_rows for i in range(len(outs))], dim=1).to(DEVICE)
    x = torch.randn(tokens + 1, in_dim, generator=gen).to(DEVICE, torch.bfloat16)
    y = torch.randn(tokens + 1, sum(outs), generator=gen).to(DEVICE, y_dtype)
    tok = torch.randperm(tokens + 1, generator=gen)[:tokens].to(DEVICE)  # one token without adapter
    want = reference(y, x, a_pool, a_rows, b_pools, b_rows, rank, tok)
    triton_ops.TritonLora().add(y, x, a_pool, a_rows, b_pools, b_rows, rank, tok)
    err = ((y.float() - want).abs() / (1 + want.abs())).max().item()
    assert err <= (1e-4 if y_dtype == torch.float32 else 1e-2), err


def test_the_start_check_catches_wrong_results():
    class OffByOneRank(triton_ops.TritonLora):
        def add(self, y, x, a_pool, a_rows, b_pools, b_rows, rank, tok=None):
            super().add(y, x, a_pool, a_rows, b_pools, [r[:, :rank - 1].contiguous() for r in b_rows], rank - 1, tok)

    assert triton_ops.check(triton_ops.TritonLora(), DEVICE, torch.float32) is None
    assert "largest relative difference" in triton_ops.check(OffByOneRank(), DEVICE, torch.float32)


def test_kernels_that_cannot_run_leave_the_torch_path(monkeypatch, caplog, world):
    """Kernels that fail at start (a compiler or driver refusal) are logged and left out; the engine
    serves with the torch path."""
    def refuse(*args):
        raise RuntimeError("no driver for this device")
    monkeypatch.setattr(triton_ops.TritonLora, "add", refuse)
    with caplog.at_level(logging.WARNING, logger="hotswap.engine"):
        eng = start_engine(world.home, native_kernels=False, triton_kernels=True)
    try:
        assert eng._base.runner.triton is None
        assert "the Triton LoRA kernels do not run here (RuntimeError: no driver for this device)" in caplog.text
        models = ["sql", None]
        outs = eng.generate_sync(prompt_requests(models, new=4))
        assert [list(o.token_ids) for o in outs] == peft_rows(world, models, new=4)
    finally:
        eng.stop_sync()


@pytest.mark.parametrize("bucketed", [False, True], ids=["eager", "bucketed"])
def test_engine_decodes_with_the_kernels_as_peft_does(world, bucketed):
    """Mixed batches of five adapters (ranks 4 to 16, different modules) and bare-base rows: every
    decode step's LoRA comes from the kernels, and every row equals PEFT's. Eager steps lay only
    adapter tokens into blocks (the kernels index tokens); bucketed ones, a GPU graph's layout, all."""
    eng = start_engine(world.home, native_kernels=False, triton_kernels=True, decode_graphs=bucketed,
                       device=DEVICE.type, dtype="float32")
    try:
        kernels = eng._base.runner.triton
        assert kernels is not None and eng._base.lora_batch_cache_bytes == 0
        calls = []
        add = kernels.add
        kernels.add = lambda *args: calls.append(args[7] is not None) or add(*args)
        names = [a.name for a in ADAPTERS]
        models = [names[0], None, *names[1:], None]
        preload(eng, names)
        outs = eng.generate_sync(prompt_requests(models, new=6))
        for i, (m, out, want) in enumerate(zip(models, outs, peft_rows(world, models, new=6))):
            assert list(out.token_ids) == want, f"row {i} ({m or 'base'}) differs from PEFT"
        assert calls, "no decode step ran the kernels"
        if bucketed:  # a bucketed step's blocks are its rows in order, bare ones reading the zero row
            assert eng._base.graphs.steps >= 4 and not all(calls)
        else:  # an eager step lays only adapter tokens into blocks: the kernels index the tokens
            assert any(calls)
    finally:
        eng.stop_sync()


def test_a_triton_that_fails_to_import_leaves_the_torch_path(monkeypatch, caplog):
    """Not only a missing Triton: one that raises something else on import (built for another torch or
    CUDA) must leave the engine importable, with the kernels off and the reason logged."""
    import importlib
    import sys

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "triton":
                raise RuntimeError("triton built for another CUDA")
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    for name in [m for m in sys.modules if m.split(".")[0] == "triton"]:
        monkeypatch.delitem(sys.modules, name)
    try:
        importlib.reload(triton_ops)
        with caplog.at_level(logging.INFO, logger="hotswap.engine"):
            assert triton_ops.load(torch.device("cpu"), torch.float32) is None
        assert "RuntimeError: triton built for another CUDA" in caplog.text
    finally:
        monkeypatch.undo()  # the real Triton back, then the module as it was
        importlib.reload(triton_ops)
    assert triton_ops.tl is not None
