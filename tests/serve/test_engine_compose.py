"""Adapters combined per request (``"sql*0.7+chat*-0.4"``): output token-identical to PEFT's
``add_weighted_adapter(combination_type="cat")`` of the same adapters and weights."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from hotswap.hub import Registry
from hotswap.serve.engine import AdapterNotFound, IncompatibleAdapter, InvalidRequest
from hotswap.serve.lora.compose import composite_digest, parse_composite

from .engine_support import (  # noqa: F401
    BASE, PROMPTS, AdapterSpec, preload, prompt_requests, save_adapter, start_engine, tiny_tokenizer, world)


def peft_combined(world, parts: list[tuple[str, float]], prompt: int, new: int) -> list[int]:
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(world.base_dir),
                                      world.adapter_dirs[parts[0][0]], adapter_name=parts[0][0])
    for name, _ in parts[1:]:
        model.load_adapter(world.adapter_dirs[name], adapter_name=name)
    model.add_weighted_adapter([n for n, _ in parts], [w for _, w in parts], "combined", combination_type="cat")
    model.set_adapter("combined")
    model.eval()
    ids = tiny_tokenizer()(PROMPTS[prompt])["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


def test_parse_and_digest():
    assert parse_composite("sql*0.7+chat@2*-0.4+mlp") == [("sql", 0.7), ("chat@2", -0.4), ("mlp", 1.0)]
    assert composite_digest([("d1", 0.5), ("d2", 1.0)]) != composite_digest([("d1", 0.5), ("d2", 1.5)])
    assert composite_digest([("d1", 0.5), ("d2", 1.0)]) != composite_digest([("d2", 1.0), ("d1", 0.5)])
    for bad, why in [("sql*abc", "'abc' of 'sql' is not a number"), ("sql*nan", "not a finite number"),
                     ("sql*1e5", r"within \[-10000, 10000\]"),
                     ("sql++chat", "empty adapter name"), ("+".join(["sql"] * 9), "at most 8")]:
        with pytest.raises(ValueError, match=why):
            parse_composite(bad)


def test_combined_rows_equal_peft_cat_bit_for_bit(world):
    from hotswap.serve.lora.compose import combine
    from hotswap.serve.lora.weights import load_adapter

    config = LlamaForCausalLM.from_pretrained(world.base_dir).config
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    parts = [("odd", 1.5), ("chat", -0.4)]
    hosts = [(load_adapter(world.adapter_dirs[n], n, n, config.num_hidden_layers, dims, 32), w) for n, w in parts]
    ours = combine(hosts, "digest", "odd*1.5+chat*-0.4", 32)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(world.base_dir), world.adapter_dirs["odd"],
                                      adapter_name="odd")
    model.load_adapter(world.adapter_dirs["chat"], adapter_name="chat")
    model.add_weighted_adapter(["odd", "chat"], [1.5, -0.4], "combined", combination_type="cat")
    for (layer, module), a in ours.a.items():
        peft_layer = getattr(getattr(model.base_model.model.model.layers[layer], "self_attn" if module in
                                     ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"), module)
        rank = a.shape[0]  # PEFT pads to the sum of the configs' ranks with zero rows
        assert torch.equal(peft_layer.lora_A["combined"].weight[:rank], a)
        assert torch.equal(peft_layer.lora_B["combined"].weight[:, :rank], ours.b[(layer, module)])
        assert not peft_layer.lora_A["combined"].weight[rank:].any() and peft_layer.scaling["combined"] == 1.0


def test_combinations_in_a_mixed_batch_match_peft_cat(world):
    combos = {"sql*0.7+chat*-0.4": [("sql", 0.7), ("chat", -0.4)],
              "odd*1.5+mlp+attn*0.25": [("odd", 1.5), ("mlp", 1.0), ("attn", 0.25)]}
    models = [None, "sql*0.7+chat*-0.4", "sql", "odd*1.5+mlp+attn*0.25", "chat"]
    want = [peft_combined(world, combos[m], i, 10) if m in combos else None for i, m in enumerate(models)]
    engine = start_engine(world.home)
    try:
        preload(engine, [m for m in models if m])
        outs = engine.generate_sync(prompt_requests(models, new=10))
        for got, expected in zip(outs, want):
            if expected is not None:
                assert list(got.token_ids) == expected
        plain = engine.generate_sync(prompt_requests([None, None], prompts=[1, 3], new=10))
        assert [list(o.token_ids) for o in plain] != [want[1], want[3]]  # the combinations change the output
        # the single adapters in the same batch are untouched by the combinations beside them
        alone = engine.generate_sync(prompt_requests([None, None, "sql", None, "chat"], new=10))
        assert [list(outs[i].token_ids) for i in (0, 2, 4)] == [list(alone[i].token_ids) for i in (0, 2, 4)]
        target = engine.resolve("sql*0.7+chat*-0.4")
        assert target.kind == "adapter" and target.ref == "sql@1*0.7+chat@1*-0.4"
        assert engine.resolve("sql@1*0.7+chat@latest*-0.4").digest == target.digest  # keyed by digests
        assert engine.resolve("sql*0.7+chat*-0.5").digest != target.digest
    finally:
        engine.stop_sync()


def test_bad_combinations_are_refused_with_the_reason(world, tmp_path):
    registry = Registry(world.home)
    dora = AdapterSpec("dora-c", 4, ("q_proj",), seed=41, extra=(("use_dora", True),))
    registry.publish(save_adapter(world.base_dir, tmp_path / "dora", dora), name="dora-c", kind="adapter", base=BASE)
    registry.close()
    engine = start_engine(world.home)
    try:
        with pytest.raises(InvalidRequest, match="'abc' of 'sql' is not a number"):
            engine.submit(prompt_requests(["sql*abc"])[0])
        with pytest.raises(AdapterNotFound, match="nope"):
            engine.submit(prompt_requests(["sql+nope"])[0])
        with pytest.raises(InvalidRequest, match="is a base; only adapters can be combined"):
            engine.submit(prompt_requests([f"sql+{BASE}"])[0])
        # found when the files are read: the request's stream ends with the reason
        for model, why in [("sql+dora-c", "DoRA updates do not add up linearly"),
                           ("chat+chat+sql", "combined rank 40 is above the engine's max_rank 32")]:
            with pytest.raises(IncompatibleAdapter, match=why):
                engine.submit(prompt_requests([model])[0]).result()
        assert engine.generate_sync(prompt_requests(["sql+mlp"]))[0].token_ids  # and serving goes on
        # a weight whose exact form has an exponent ("1e-07") still reads back as one part
        assert engine.generate_sync(prompt_requests(["sql*1e4+mlp*1e-7"]))[0].token_ids
        assert engine.resolve("sql*1e4+mlp*1e-7").ref == "sql@1*10000.0+mlp@1*1e-07"
    finally:
        engine.stop_sync()
