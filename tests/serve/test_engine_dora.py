"""DoRA adapters served in mixed batches: greedy output token-identical to PEFT running each alone,
through the native kernels, the torch path and the bucketed decode steps."""

from __future__ import annotations

import pytest

from hotswap.serve.engine import IncompatibleAdapter

from .engine_support import (  # noqa: F401
    ALL, AdapterSpec, edit_config, peft_rows, preload, prompt_requests, publish, publish_specs, start_engine, world)

DORA = [AdapterSpec("dora-all", 8, tuple(ALL), alpha=16, seed=31, extra=(("use_dora", True),)),
        AdapterSpec("dora-qv", 4, ("q_proj", "v_proj", "down_proj"), alpha=8, seed=32, rslora=True,
                    extra=(("use_dora", True),))]


@pytest.fixture(scope="module")
def dora_world(world, tmp_path_factory):
    publish_specs(world, tmp_path_factory.mktemp("dora"), DORA)
    return world


@pytest.mark.parametrize("overrides", [
    {}, {"native_kernels": False}, {"decode_graphs": True},
    {"decode_graphs": True, "native_kernels": False, "triton_kernels": True}],
    ids=["native", "torch", "bucketed", "bucketed-triton"])
def test_dora_rows_in_a_mixed_batch_match_peft(dora_world, overrides):
    models = [None, "dora-all", "chat", "dora-qv", "sql", "dora-all"]
    want = peft_rows(dora_world, models, prompts=[0, 1, 2, 3, 4, 5], new=10)
    engine = start_engine(dora_world.home, **overrides)
    try:
        preload(engine, [m for m in models if m])
        outs = engine.generate_sync(prompt_requests(models, prompts=[0, 1, 2, 3, 4, 5], new=10))
        assert [list(o.token_ids) for o in outs] == want
        if overrides.get("decode_graphs"):  # the DoRA rows decoded at the graphs' shapes, not eagerly
            assert engine._base.graphs.steps >= 9
    finally:
        engine.stop_sync()


def test_dora_scales_change_the_output(dora_world, tmp_path):
    """The same weights with use_dora off give other tokens: the magnitudes are really applied."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(dora_world.adapter_dirs["dora-all"], plain)
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(plain / "adapter_model.safetensors").items() if "magnitude" not in k}
    save_file(tensors, plain / "adapter_model.safetensors")
    edit_config(plain, use_dora=False)
    publish(dora_world, {"dora-all-plain": plain})
    engine = start_engine(dora_world.home)
    try:
        preload(engine, ["dora-all", "dora-all-plain"])
        outs = engine.generate_sync(prompt_requests(["dora-all", "dora-all-plain"], prompts=[1, 1], new=10))
        assert outs[0].token_ids != outs[1].token_ids
    finally:
        engine.stop_sync()


def test_a_dora_file_without_its_magnitudes_is_refused(dora_world, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(dora_world.adapter_dirs["dora-qv"], broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    dropped = next(k for k in tensors if "magnitude" in k)
    del tensors[dropped]
    save_file(tensors, broken / "adapter_model.safetensors")
    publish(dora_world, {"dora-broken": broken})  # each tensor it holds fits the base
    engine = start_engine(dora_world.home)
    try:
        with pytest.raises(IncompatibleAdapter, match="lora_magnitude_vector is missing"):
            engine.load_future("dora-broken").result(timeout=30)
    finally:
        engine.stop_sync()


def test_expanded_dora_norm_equals_the_merged_weights_norm(dora_world):
    import torch
    from transformers import LlamaForCausalLM

    from hotswap.serve.lora.spec import PARENT
    from hotswap.serve.lora.weights import dora_scales, load_adapter

    model = LlamaForCausalLM.from_pretrained(dora_world.base_dir)
    weight = lambda layer, m: getattr(getattr(model.model.layers[layer], PARENT[m]), m).weight.detach()  # noqa: E731
    dims = {m: tuple(reversed(weight(0, m).shape)) for m in ALL}
    host = load_adapter(dora_world.adapter_dirs["dora-qv"], "d", "dora-qv@1", 3, dims, max_rank=32)
    scales = dora_scales(host, weight, lambda layer, m: weight(layer, m).square().sum(1))
    assert set(scales) == set(host.magnitude) and len(scales) == 9
    for (layer, m), g in scales.items():
        merged = weight(layer, m) + host.spec.scales[(layer, m)] * (host.b[(layer, m)] @ host.a[(layer, m)])
        torch.testing.assert_close(g, host.magnitude[(layer, m)] / torch.linalg.norm(merged, dim=1),
                                   rtol=1e-5, atol=0)


def test_bucketed_dora_steps_make_a_scale_table_once_per_row_count(dora_world, monkeypatch):
    """The table of DoRA scales that bucketed steps (a GPU's graphs) read is made once per row count
    and refilled in place, not allocated again every step (for a 1B base's 32 rows, 24 MB a step)."""
    from hotswap.serve.engine import decode_graphs

    made = []

    class Counted(decode_graphs.DoraTable):
        def __init__(self, pool, rows):
            made.append(rows)
            super().__init__(pool, rows)
    monkeypatch.setattr(decode_graphs, "DoraTable", Counted)
    models = [None, "dora-all", "sql"]
    engine = start_engine(dora_world.home, decode_graphs=True, native_kernels=False)
    try:
        preload(engine, [m for m in models if m])
        outs = engine.generate_sync(prompt_requests(models, new=8))
        assert engine._base.graphs.steps >= 7
    finally:
        engine.stop_sync()
    assert made and len(made) == len(set(made))
    assert [list(o.token_ids) for o in outs] == peft_rows(dora_world, models, new=8)
