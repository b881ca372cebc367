"""PEFT is the oracle: in mixed batches every row is token-identical to PEFT running its adapter alone."""

from __future__ import annotations

import pytest

from hotswap.serve.engine import GenerationRequest, SamplingParams

from .engine_support import ADAPTERS, PROMPTS, engine, peft_greedy, preload, start_engine, world  # noqa: F401

NEW = 10


@pytest.fixture(scope="module")
def oracle(world):
    """PEFT greedy continuations per (adapter or None, prompt index)."""
    from .engine_support import tiny_tokenizer

    tok = tiny_tokenizer()
    cache = {}

    def get(model: str | None, prompt: int) -> list[int]:
        key = (model, prompt)
        if key not in cache:
            ids = tok(PROMPTS[prompt])["input_ids"]
            cache[key] = peft_greedy(world.base_dir, world.adapter_dirs[model] if model else None, ids, NEW)
        return cache[key]
    return get


def request(engine, model, prompt: int, new: int = NEW) -> GenerationRequest:
    ids = engine.tokenizer(PROMPTS[prompt])["input_ids"]
    return GenerationRequest(prompt_token_ids=ids, model=model, sampling=SamplingParams(max_tokens=new))


def test_mixed_batch_matches_peft_per_adapter(engine, oracle):
    names = [a.name for a in ADAPTERS]
    preload(engine, names)
    # five adapters of ranks 4..16 on different module sets (one with rank/alpha patterns, one rsLoRA)
    # plus bare-base rows, all in one batch
    models = names + [None, None, names[1]]
    reqs = [request(engine, m, i) for i, m in enumerate(models)]
    outs = engine.generate_sync(reqs)
    for i, (m, out) in enumerate(zip(models, outs)):
        assert list(out.token_ids) == oracle(m, i), f"row {i} ({m or 'base'}) differs from PEFT"
    # they shared steps: prefill (77 tokens, budget 64) in two, then one decode step per token
    assert engine.stats().steps <= NEW + 1


def test_chunked_prefill_and_joins_match_peft(world, oracle):
    # a 5-token budget forces prompts into chunks computed beside other rows' decodes; with no
    # room to keep a batch's rows gathered, every layer gathers its own
    eng = start_engine(world.home, max_batch_tokens=5, lora_batch_cache_bytes=0)
    try:
        preload(eng, ["chat", "sql"])
        first = eng.submit(request(eng, "chat", 1))
        head = next(iter(first)).token_ids  # running and decoding ...
        later = [eng.submit(request(eng, m, i)) for i, m in [(2, "sql"), (3, None)]]  # ... others join
        assert list(head + first.result().token_ids) == oracle("chat", 1)
        assert [list(s.result().token_ids) for s in later] == [oracle("sql", 2), oracle(None, 3)]
    finally:
        eng.stop_sync()


def test_whole_block_prefill_matches_peft(engine, world):
    """Prompts of 8 tokens each, all with adapters: blocks are exactly the prompts (the in-place path)."""
    from .engine_support import tiny_tokenizer

    preload(engine, ["chat", "attn"])
    ids = [tiny_tokenizer()(PROMPTS[i])["input_ids"][:8] for i in (1, 4)]
    ids = [(p * 8)[:8] for p in ids]
    reqs = [GenerationRequest(prompt_token_ids=p, model=m, sampling=SamplingParams(max_tokens=NEW))
            for p, m in zip(ids, ["chat", "attn"])]
    for p, m, out in zip(ids, ["chat", "attn"], engine.generate_sync(reqs)):
        assert list(out.token_ids) == peft_greedy(world.base_dir, world.adapter_dirs[m], p, NEW)


def test_rows_leave_early_without_disturbing_others(engine, oracle):
    preload(engine, ["mlp", "attn"])
    short = engine.submit(request(engine, "mlp", 4, new=2))
    long = engine.submit(request(engine, "attn", 5))
    assert list(short.result().token_ids) == oracle("mlp", 4)[:2]
    late = engine.submit(request(engine, "odd", 6))  # joins while "attn" still decodes
    assert list(long.result().token_ids) == oracle("attn", 5)
    assert list(late.result().token_ids) == oracle("odd", 6)


def test_lora_pool_rows_match_peft_weights(engine, world):
    """The rows copied into the pool are PEFT's A and scale-folded B (rank_pattern, alpha_pattern, rsLoRA)."""
    import math

    import torch
    from safetensors.torch import load_file

    preload(engine, ["odd", "attn"])
    pool = engine._base.runner.lora
    for name in ("odd", "attn"):
        view = next(v for v in engine._core.residency.views() if v.ref == f"{name}@1")
        slot = next(s for s in pool._slots.values() if s.rank == view.rank and set(s.rows) == set(view.modules))
        tensors = load_file(world.adapter_dirs[name] / "adapter_model.safetensors")
        spec = next(a for a in ADAPTERS if a.name == name)
        for module, rows in slot.rows.items():
            a_pool, b_pool = pool.module_view(module, 1)
            key = f"base_model.model.model.layers.1.{'self_attn' if module[0] in 'qkvo' else 'mlp'}.{module}"
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            r = a.shape[0]
            alpha = 3 if (name == "odd" and module == "k_proj") else spec.alpha
            scale = alpha / math.sqrt(r) if spec.rslora else alpha / r
            assert torch.equal(a_pool[rows[:r]], a)
            assert torch.allclose(b_pool[rows[:r]], b.T * scale)
            assert not b_pool[rows[r:]].any() if len(rows) > r else True


def test_the_pure_torch_path_matches_peft_too(world, oracle):
    """With the native kernel off (no compiler, or HOTSWAP_NATIVE=0), batched torch ops do the LoRA math."""
    eng = start_engine(world.home, native_kernels=False)
    try:
        assert eng._base.runner.kernels is None
        names = [a.name for a in ADAPTERS]
        preload(eng, names)
        models = names + [None, names[1]]
        outs = eng.generate_sync([request(eng, m, i) for i, m in enumerate(models)])
        for i, (m, out) in enumerate(zip(models, outs)):
            assert list(out.token_ids) == oracle(m, i), f"row {i} ({m or 'base'}) differs from PEFT"
    finally:
        eng.stop_sync()


def test_the_native_kernels_serve_cpu_steps_and_match_peft(engine, oracle, monkeypatch):
    """Decode steps run their projections natively, LoRA added in the same call; longer prefills keep
    BLAS plus the LoRA kernel. Either way every row matches PEFT."""
    from hotswap.serve.engine import model
    from hotswap.serve.lora import native

    assert engine._base.runner.kernels is native.load() is not None
    # the 4 prompts' prefill goes over this threshold, the 4-row decode steps stay under it
    monkeypatch.setattr(model, "NATIVE_PROJECTION_TOKENS", 8)
    calls = {"fused": 0, "base": 0, "lora": 0}
    for cls, method, key in ((native.GroupCall, "project", "fused"), (native.CpuKernels, "project", "base"),
                             (native.GroupCall, "__call__", "lora")):
        def counted(*args, _orig=getattr(cls, method), _key=key):
            calls[_key] += 1
            return _orig(*args)
        monkeypatch.setattr(cls, method, counted)
    names = [a.name for a in ADAPTERS]
    preload(engine, names)
    models = [names[0], None, names[1], names[2]]
    outs = engine.generate_sync([request(engine, m, i) for i, m in enumerate(models)])
    for i, (m, out) in enumerate(zip(models, outs)):
        assert list(out.token_ids) == oracle(m, i), f"row {i} ({m or 'base'}) differs from PEFT"
    # the prefill (4 prompts, over 8 tokens) took BLAS and the LoRA kernel, decode steps the fused
    # projections and the native lm_head
    assert calls["lora"] > 0 and calls["fused"] > 0 and calls["base"] > 0
