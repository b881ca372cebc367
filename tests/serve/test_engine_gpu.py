"""The engine on a CUDA device: the same PEFT oracle as on the CPU (``make test-gpu``; CI has no GPU).

float32 on the GPU must give PEFT's tokens exactly, as on the CPU; bfloat16 (the GPU default) must
serve every row and repeat itself exactly.
"""

from __future__ import annotations

import pytest
import torch

from .engine_support import ADAPTERS, peft_rows, preload, prompt_requests, start_engine, world  # noqa: F401

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
NEW = 8


@pytest.mark.parametrize("overrides", [
    {}, {"decode_graphs": False}, {"triton_kernels": False},
    {"triton_kernels": False, "decode_graphs": False}, {"triton_kernels": False, "decode_graphs": False, "lora_batch_cache_bytes": 0}],
    ids=["cuda-graphs-triton", "eager-triton", "cuda-graphs-gathered", "eager-rows-kept", "eager-rows-gathered-per-layer"])
def test_float32_mixed_batch_on_the_gpu_matches_peft(world, overrides):
    names = [a.name for a in ADAPTERS]
    models = names + [None, names[1]]
    eng = start_engine(world.home, device="cuda", dtype="float32", **overrides)
    try:
        assert eng._base.runner.embed.is_cuda and eng._base.runner.kernels is None
        # the Triton decode kernels compile and pass their start check on this GPU, unless turned off
        assert (eng._base.runner.triton is not None) == overrides.get("triton_kernels", True)
        preload(eng, names)
        outs = eng.generate_sync(prompt_requests(models))
        graphs = eng._base.graphs
        if overrides.get("decode_graphs", True):  # decode steps replayed graphs (7 rows: bucket 8, rank 16)
            assert graphs is not None and graphs.captures >= 1 and graphs.steps >= NEW - 1
        else:
            assert graphs is None
    finally:
        eng.stop_sync()
    for i, (m, out, want) in enumerate(zip(models, outs, peft_rows(world, models))):
        assert list(out.token_ids) == want, f"row {i} ({m or 'base'}) differs from PEFT"


def test_rows_join_mid_batch_on_the_gpu(world):
    """A 5-token step budget: prompts are chunked beside other rows' decodes, as under traffic."""
    eng = start_engine(world.home, device="cuda", dtype="float32", max_batch_tokens=5)
    try:
        preload(eng, ["chat", "sql"])
        first = eng.submit(prompt_requests(["chat"])[0])
        head = next(iter(first)).token_ids
        later = [eng.submit(r) for r in prompt_requests(["chat", "sql", None])[1:]]
        got = [list(head + first.result().token_ids)] + [list(s.result().token_ids) for s in later]
        assert eng._base.graphs.captures >= 2  # batches of 1 and of 3 rows
    finally:
        eng.stop_sync()
    assert got == peft_rows(world, ["chat", "sql", None])


def test_bfloat16_on_the_gpu_serves_mixed_batches_deterministically(world):
    """bf16 rounding moves this tiny model's logits too far for a token oracle (PEFT's own bf16 run
    is 84% off its float32 logits on one adapter), so bf16 is held to what it must keep: every row
    served, and greedy runs repeating exactly. (A row's bf16 tokens may change with its batch: other
    batch sizes pick other matrix kernels, which round differently.)"""
    names = [a.name for a in ADAPTERS]
    models = names + [None, names[0]]
    eng = start_engine(world.home, device="cuda")  # the GPU default: bfloat16
    try:
        # the GPU's defaults serve it: the Triton kernels passed their bf16 start check, decode replays graphs
        assert eng._base.runner.embed.dtype == torch.bfloat16 and eng._base.runner.triton is not None
        preload(eng, names)
        first = eng.generate_sync(prompt_requests(models))
        again = eng.generate_sync(prompt_requests(models))
        assert eng._base.graphs is not None and eng._base.graphs.captures >= 1
        assert eng._base.graphs.steps >= 2 * (NEW - 1)
    finally:
        eng.stop_sync()
    assert all(len(o.token_ids) == NEW for o in first)
    assert [list(o.token_ids) for o in again] == [list(o.token_ids) for o in first]


def test_dora_and_edge_rows_in_cuda_graphs_match_peft(world, tmp_path_factory):
    """DoRA and embed_tokens/lm_head adapters beside plain ones decode from the graphs (lm_head's LoRA
    through the Triton kernels), in float32, token for token as PEFT."""
    from dataclasses import replace

    from .engine_support import publish_specs
    from .test_engine_dora import DORA
    from .test_engine_edges import EDGE

    publish_specs(world, tmp_path_factory.mktemp("gpu-dora-edges"), [replace(s, name=f"gpu-{s.name}") for s in DORA + EDGE])
    models = [None, "gpu-dora-all", "gpu-edge-all", "chat", "gpu-edge-head", "gpu-dora-qv", "gpu-edge-embed"]
    eng = start_engine(world.home, device="cuda", dtype="float32")
    try:
        preload(eng, [m for m in models if m])
        outs = eng.generate_sync(prompt_requests(models))
        assert eng._base.runner.triton is not None and eng._base.graphs.steps >= NEW - 1
    finally:
        eng.stop_sync()
    assert [list(o.token_ids) for o in outs] == peft_rows(world, models)
