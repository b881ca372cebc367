"""LoRA on embed_tokens and lm_head (PEFT's ``lora_embedding_A/B`` and an lm_head ``lora_A/B``):
greedy output token-identical to PEFT in mixed batches, through the native kernels, the torch path
and the bucketed decode steps; combined like any adapter; PEFT's copies of the base weights checked."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotswap.serve.engine import CapacityExceeded, GenerationRequest, IncompatibleAdapter, SamplingParams
from hotswap.serve.lora.edges import embed_delta, head_delta

from .engine_support import (  # noqa: F401
    AdapterSpec, peft_greedy, peft_rows, preload, prompt_requests, publish, publish_specs, start_engine, world)
from .test_engine_compose import peft_combined

EDGE = [AdapterSpec("edge-all", 4, ("embed_tokens", "lm_head", "q_proj", "down_proj"), seed=41),
        AdapterSpec("edge-embed", 8, ("embed_tokens", "v_proj"), alpha=8, seed=42),
        AdapterSpec("edge-head", 6, ("lm_head",), alpha=12, seed=43, rslora=True)]
MIXED = [None, "edge-all", "chat", "edge-embed", "edge-head", "sql", "edge-all"]


@pytest.fixture(scope="module")
def edge_world(world, tmp_path_factory):
    publish_specs(world, tmp_path_factory.mktemp("edges"), EDGE)
    return world


def test_deltas_follow_peft_per_token():
    """Each token's own rows, in its adapter's order, with row 0 (zeros) as padding: PEFT's formulas."""
    torch.manual_seed(0)
    vocab, hidden = 30, 8
    a_pool, b_pool = torch.randn(7, vocab), torch.randn(7, hidden)  # rows 1-3: adapter x, 4-5: adapter y
    a_pool[0], b_pool[0] = 0, 0
    rows = torch.tensor([[1, 2, 3], [4, 5, 0], [0, 0, 0], [4, 5, 0]])  # the third token has no adapter
    ids = torch.tensor([5, 29, 5, 7])
    want = torch.stack([b_pool[r].T @ a_pool[r][:, i] for r, i in zip(rows, ids)])
    torch.testing.assert_close(embed_delta(ids, rows, a_pool, b_pool, torch.float32), want)
    h = torch.randn(4, hidden)
    a_head, b_head = torch.randn(7, hidden), torch.randn(7, vocab)
    a_head[0], b_head[0] = 0, 0
    want = torch.stack([b_head[r].T @ (a_head[r] @ h[t]) for t, r in enumerate(rows)])
    torch.testing.assert_close(head_delta(h, rows, a_head, b_head), want)


def test_output_does_not_depend_on_where_an_adapter_sits_in_the_pool(edge_world):
    """The same greedy request, with edge-all loaded first or after two others (so at other rows),
    gives the same tokens: in bfloat16 too, where any change in the order of a sum shows."""
    outs = []
    for first in ([], ["edge-head", "edge-embed"]):
        engine = start_engine(edge_world.home, dtype="bfloat16")
        try:
            preload(engine, first + ["edge-all"])
            pool = engine._core.residency.pool
            outs.append((engine.generate_sync(prompt_requests(["edge-all"] * 3, prompts=[0, 1, 2], new=8)),
                         next(s.rows["lm_head"] for s in pool._slots.values() if len(s.rows.get("lm_head", ())) == 4
                              and "q_proj" in s.rows)))
        finally:
            engine.stop_sync()
    (alone, rows_alone), (after, rows_after) = outs
    assert rows_alone != rows_after  # it really sat elsewhere
    assert [o.token_ids for o in alone] == [o.token_ids for o in after]


@pytest.mark.parametrize("overrides", [{}, {"native_kernels": False}, {"decode_graphs": True}],
                         ids=["native", "torch", "bucketed"])
def test_edge_rows_in_a_mixed_batch_match_peft(edge_world, overrides):
    prompts = list(range(len(MIXED)))
    want = peft_rows(edge_world, MIXED, prompts=prompts, new=10)
    engine = start_engine(edge_world.home, **overrides)
    try:
        preload(engine, [m for m in MIXED if m])
        outs = engine.generate_sync(prompt_requests(MIXED, prompts=prompts, new=10))
        assert [list(o.token_ids) for o in outs] == want
    finally:
        engine.stop_sync()


@pytest.mark.parametrize("models, overrides", [
    ([None, "edge-embed", "chat", "edge-embed"], {}),  # embed_tokens LoRA at the graphs' shapes
    (MIXED, {"native_kernels": False, "triton_kernels": True})],  # lm_head's too, with the Triton kernels
    ids=["embed", "all-edges-triton"])
def test_edge_rows_decode_at_the_graphs_shapes(edge_world, models, overrides):
    """An edge adapter in a batch does not send its decode steps to the eager path (on a GPU, the
    whole batch would lose its graphs); every row still equals PEFT's."""
    prompts = list(range(len(models)))
    want = peft_rows(edge_world, models, prompts=prompts, new=10)
    engine = start_engine(edge_world.home, decode_graphs=True, **overrides)
    try:
        preload(engine, [m for m in models if m])
        outs = engine.generate_sync(prompt_requests(models, prompts=prompts, new=10))
        assert [list(o.token_ids) for o in outs] == want
        assert engine._base.graphs.steps >= 9
    finally:
        engine.stop_sync()


@pytest.mark.parametrize("overrides", [{}, {"native_kernels": False}], ids=["native", "torch"])
def test_edge_ranks_pad_only_the_edges(edge_world, overrides):
    """The layers pad to the step's highest layer rank, not to an edge's: an lm_head-only adapter's step
    runs no layer LoRA at all (rank 0), beside a rank-4 adapter the layers take rank 4, and the outputs
    stay PEFT's."""
    from hotswap.serve.lora.batch import build_lora_step

    engine = start_engine(edge_world.home, **overrides)
    try:
        preload(engine, ["edge-head", "edge-all", "chat"])
        pool = engine._core.residency.pool
        by_head_rank = {len(s.rows["lm_head"]): i for i, s in pool._slots.items() if "lm_head" in s.rows}
        head_only, all4 = by_head_rank[6], by_head_rank[4]  # edge-head: lm_head rank 6; edge-all: rank 4 everywhere
        kernel = pool.kernels is not None
        alone = build_lora_step([(0, 3, head_only), (3, 2, -1)], 5, pool, torch.device("cpu"), kernel=kernel)
        assert alone.rank == 0 and alone.kernel_calls is None and alone.edges["lm_head"].shape == (5, 6)
        mixed = build_lora_step([(0, 1, head_only), (1, 1, all4)], 2, pool, torch.device("cpu"), kernel=kernel)
        assert mixed.rank == 4 and mixed.edges["lm_head"].shape == (2, 6)
        models = ["edge-head", None, "edge-head"]
        outs = engine.generate_sync(prompt_requests(models, prompts=[0, 1, 2], new=10))
        assert [list(o.token_ids) for o in outs] == peft_rows(edge_world, models, prompts=[0, 1, 2], new=10)
    finally:
        engine.stop_sync()


def test_each_edge_changes_the_output(edge_world):
    """An lm_head-only and an embedding-heavy adapter give other tokens than the bare base."""
    base = peft_rows(edge_world, [None, None], prompts=[3, 4], new=10)
    adapted = peft_rows(edge_world, ["edge-embed", "edge-head"], prompts=[3, 4], new=10)
    assert base[0] != adapted[0] and base[1] != adapted[1]


def test_edge_adapters_combine_like_peft_cat(edge_world):
    combo = "edge-all*0.6+edge-head*-0.5+sql"
    want = peft_combined(edge_world, [("edge-all", 0.6), ("edge-head", -0.5), ("sql", 1.0)], 2, 10)
    engine = start_engine(edge_world.home)
    try:
        outs = engine.generate_sync(prompt_requests([None, "edge-embed", combo], new=10))
        assert list(outs[2].token_ids) == want
    finally:
        engine.stop_sync()


def test_more_edge_adapters_than_edge_rows_evict_and_reload(edge_world):
    """8 edge rows hold edge-all (4 rows in each edge pool) or edge-embed (8) but not both: the
    pool evicts between requests, and every output still matches PEFT's."""
    order = ["edge-all", "edge-embed", "edge-all", "edge-head", "edge-embed"]
    want = peft_rows(edge_world, order, prompts=[0, 1, 2, 3, 4], new=6)
    engine = start_engine(edge_world.home, edge_lora_rows=8)
    try:
        for i, name in enumerate(order):
            [out] = engine.generate_sync(prompt_requests([name], prompts=[i], new=6))
            assert list(out.token_ids) == want[i], name
        assert engine.stats().adapter_evictions.get("device", 0) >= 3
    finally:
        engine.stop_sync()


def test_no_edge_rows_refuses_edge_adapters_with_the_setting(edge_world):
    engine = start_engine(edge_world.home, edge_lora_rows=0)
    try:
        with pytest.raises(CapacityExceeded, match=r"8 rows in the embed_tokens pool .* \(raise edge_lora_rows\)"):
            engine.load_future("edge-embed").result(timeout=30)
        [out] = engine.generate_sync(prompt_requests(["sql"], new=4))  # everything else is still served
        assert len(out.token_ids) == 4
    finally:
        engine.stop_sync()


def test_base_copies_are_checked_then_dropped(edge_world, tmp_path):
    """PEFT saves the base's embedding and lm_head beside an edge LoRA: equal copies are dropped
    from the host tier; a changed copy (a retrained vocabulary) is refused with the reason."""
    folder = edge_world.adapter_dirs["edge-all"]
    tensors = load_file(folder / "adapter_model.safetensors")
    copies = [k for k in tensors if k.endswith("base_layer.weight")]
    assert sorted(k.split(".")[-3] for k in copies) == ["embed_tokens", "lm_head"]
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    tensors[copies[0]][3] += 0.5
    save_file(tensors, changed / "adapter_model.safetensors")
    publish(edge_world, {"edge-changed": changed})
    engine = start_engine(edge_world.home)
    try:
        with pytest.raises(IncompatibleAdapter, match="copy of the base's .* weight differs from the base's"):
            engine.load_future("edge-changed").result(timeout=30)
        engine.load_future("edge-all").result(timeout=30)
        [view] = [v for v in engine._core.residency.views() if v.ref.startswith("edge-all")]
        lora_bytes = sum(t.nbytes for k, t in load_file(folder / "adapter_model.safetensors").items() if "lora_" in k)
        assert view.host_bytes == lora_bytes < (folder / "adapter_model.safetensors").stat().st_size
        [entry] = [r for r in engine.residency() if r.ref.startswith("edge-all")]
        assert entry.target_modules == ("q_proj", "down_proj", "embed_tokens", "lm_head")
    finally:
        engine.stop_sync()


def test_prompt_logprobs_of_an_edge_adapter_match_peft_across_chunks(edge_world):
    """Scored prompt rows take the lm_head LoRA too, chunk after chunk (64-token steps), beside a base row."""
    from .engine_support import PROMPTS, tiny_tokenizer
    from .test_engine_logprobs import reference_logprobs

    prompt = tiny_tokenizer()(" ".join(PROMPTS) * 2)["input_ids"][:100]
    engine = start_engine(edge_world.home)
    try:
        preload(engine, ["edge-all"])
        outs = engine.generate_sync([
            GenerationRequest(prompt_token_ids=prompt, model="edge-all", sampling=SamplingParams(max_tokens=2, prompt_logprobs=1)),
            GenerationRequest(prompt_token_ids=prompt[:30], sampling=SamplingParams(max_tokens=3))])
        ref = reference_logprobs(edge_world, "edge-all", prompt[:1], prompt[1:])
        got = [entry.chosen.logprob for entry in outs[0].prompt_logprobs[1:]]
        assert got == pytest.approx([float(ref[pos, t]) for pos, t in enumerate(prompt[1:])], abs=1e-3)
    finally:
        engine.stop_sync()


@pytest.mark.parametrize("overrides", [{}, {"native_kernels": False}], ids=["native", "torch"])
def test_a_step_of_prefill_chunks_only_with_an_lm_head_adapter(edge_world, overrides):
    """A long prompt in chunks of 8 tokens: its first steps ask for no logits row at all, and the
    lm_head LoRA then has no row to add to (the torch path had failed those steps)."""
    from .engine_support import PROMPTS, tiny_tokenizer

    prompt = tiny_tokenizer()(" ".join(PROMPTS))["input_ids"][:40]
    want = peft_greedy(edge_world.base_dir, edge_world.adapter_dirs["edge-head"], prompt, 6)
    engine = start_engine(edge_world.home, max_batch_tokens=8, **overrides)
    try:
        preload(engine, ["edge-head"])
        out = engine.generate_sync([GenerationRequest(prompt_token_ids=prompt, model="edge-head",
                                                      sampling=SamplingParams(max_tokens=6))])[0]
        assert list(out.token_ids) == want
    finally:
        engine.stop_sync()
