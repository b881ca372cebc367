"""Adapters the engine cannot apply exactly are refused at load, with the reason."""

from __future__ import annotations

import pytest

from hotswap.serve.lora.spec import AdapterRefused, build_spec, check_config

DIMS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64),
        "embed_tokens": (100, 64), "lm_head": (64, 100)}  # vocab 100
EMBED, HEAD = "base_model.model.model.embed_tokens", "base_model.model.lm_head"
EDGE_TENSORS = {f"{EMBED}.lora_embedding_A": (8, 100), f"{EMBED}.lora_embedding_B": (64, 8),
                f"{HEAD}.lora_A.weight": (8, 64), f"{HEAD}.lora_B.weight": (100, 8)}
PREFIX = "base_model.model.model.layers"


def shapes(module="q_proj", parent="self_attn", r=8, layer=0):
    d_in, d_out = DIMS[module]
    return {f"{PREFIX}.{layer}.{parent}.{module}.lora_A.weight": (r, d_in),
            f"{PREFIX}.{layer}.{parent}.{module}.lora_B.weight": (d_out, r)}


BASE_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}


@pytest.mark.parametrize("change, reason", [
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "bias on lora_B"),
    ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
    ({"init_lora_weights": "pissa"}, "rewritten base"),
    ({"peft_type": "IA3"}, "not LoRA"),
    ({"r": 128}, "above the engine's max_rank 64"),
    ({"some_future_option": 3}, "unknown adapter config fields"),
])
def test_config_refusals(change, reason):
    with pytest.raises(AdapterRefused, match=reason):
        check_config({**BASE_CONFIG, **change}, max_rank=64)


def test_plain_config_passes_and_neutral_fields_are_ignored():
    check_config({**BASE_CONFIG, "lora_dropout": 0.1, "use_rslora": True, "layers_to_transform": [0],
                  "exclude_modules": ["x"], "init_lora_weights": "gaussian"}, max_rank=64)


@pytest.mark.parametrize("tensors, reason", [
    ({f"{EMBED}.lora_embedding_A": (8, 100)}, "embed_tokens: lora_A and lora_B must both be present"),
    ({f"{EMBED}.lora_embedding_A": (8, 90), f"{EMBED}.lora_embedding_B": (64, 8)},
     r"embed_tokens: .* do not fit a 100->64 embedding"),
    ({f"{HEAD}.lora_A.weight": (8, 64), f"{HEAD}.lora_B.weight": (99, 8)}, "lm_head: .* do not fit a 64->100 linear"),
    ({f"{EMBED}.lora_A.weight": (8, 100), f"{EMBED}.lora_B.weight": (64, 8)}, "outside the decoder's linear layers"),
    ({**EDGE_TENSORS, f"{EMBED}.base_layer.weight": (100, 32)}, r"shape \(100, 32\), but the base's embed_tokens"),
    ({**shapes(), f"{HEAD}.base_layer.weight": (100, 64)}, "a copy of the base's lm_head weight, but no LoRA"),
    ({"base_model.model.model.norm.weight": (64,)}, "outside the decoder's linear layers"),
    (shapes("q_proj", parent="mlp"), "not one of"),
    (shapes(layer=7), "layer 7 does not exist"),
    ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": (8, 64)}, "must both be present"),
    ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": (8, 60),
      f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": (64, 8)}, "do not fit a 64->64"),
    (shapes(r=4), "tensors have rank 4 but the config says 8"),
    ({f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": (64,), **shapes()}, "does not set use_dora"),
    ({}, "no LoRA tensors"),
])
def test_tensor_refusals(tensors, reason):
    with pytest.raises(AdapterRefused, match=reason):
        build_spec(BASE_CONFIG, tensors, num_layers=2, dims=DIMS, max_rank=64)


def test_scales_follow_alpha_rslora_and_patterns():
    tensors = {**shapes("q_proj", r=8), **shapes("down_proj", parent="mlp", r=2), **shapes("q_proj", r=8, layer=1)}
    config = {**BASE_CONFIG, "target_modules": ["q_proj", "down_proj"], "rank_pattern": {"down_proj": 2},
              "alpha_pattern": {"layers.1.self_attn.q_proj": 4}}
    spec = build_spec(config, tensors, num_layers=2, dims=DIMS, max_rank=64)
    assert spec.scales == {(0, "q_proj"): 2.0, (0, "down_proj"): 8.0, (1, "q_proj"): 0.5}
    assert spec.module_rank("q_proj") == 8 and spec.module_rank("down_proj") == 2
    rs = build_spec({**BASE_CONFIG, "use_rslora": True}, shapes(r=8), num_layers=2, dims=DIMS, max_rank=64)
    assert rs.scales[(0, "q_proj")] == pytest.approx(16 / 8 ** 0.5)


def test_dora_needs_one_magnitude_per_output_of_every_targeted_layer():
    dora = {**BASE_CONFIG, "use_dora": True}
    magnitude = f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector"
    spec = build_spec(dora, {**shapes(), magnitude: (64,)}, num_layers=2, dims=DIMS, max_rank=64)
    assert spec.magnitudes == {(0, "q_proj"): magnitude}
    assert build_spec(BASE_CONFIG, shapes(), num_layers=2, dims=DIMS, max_rank=64).magnitudes is None
    with pytest.raises(AdapterRefused, match="lora_magnitude_vector is missing"):
        build_spec(dora, shapes(), num_layers=2, dims=DIMS, max_rank=64)
    with pytest.raises(AdapterRefused, match=r"DoRA magnitude \(32,\) does not fit the 64 outputs"):
        build_spec(dora, {**shapes(), magnitude: (32,)}, num_layers=2, dims=DIMS, max_rank=64)


def test_edge_lora_is_read_with_its_base_copies():
    """LoRA on embed_tokens and lm_head: pairs at layer 0, scales from the patterns, and PEFT's
    copies of the base weights listed for the check against the base."""
    copies = {f"{EMBED}.base_layer.weight": (100, 64), f"{HEAD}.base_layer.weight": (100, 64)}
    config = {**BASE_CONFIG, "target_modules": ["embed_tokens", "lm_head", "q_proj"], "alpha_pattern": {"lm_head": 4}}
    spec = build_spec(config, {**EDGE_TENSORS, **copies, **shapes()}, num_layers=2, dims=DIMS, max_rank=64)
    assert spec.ranks == {(0, "q_proj"): 8, (0, "embed_tokens"): 8, (0, "lm_head"): 8}
    assert spec.scales[(0, "embed_tokens")] == 2.0 and spec.scales[(0, "lm_head")] == 0.5
    assert spec.modules == ("q_proj",) and spec.targets == ("q_proj", "embed_tokens", "lm_head")
    assert spec.keys[(0, "embed_tokens")] == (f"{EMBED}.lora_embedding_A", f"{EMBED}.lora_embedding_B")
    assert spec.base_copies == {"embed_tokens": f"{EMBED}.base_layer.weight", "lm_head": f"{HEAD}.base_layer.weight"}
    edges_only = {**BASE_CONFIG, "target_modules": ["embed_tokens", "lm_head"]}
    assert build_spec(edges_only, EDGE_TENSORS, num_layers=2, dims=DIMS, max_rank=64).base_copies is None


@pytest.mark.parametrize("config, reason", [
    ({**BASE_CONFIG, "use_dora": True}, "DoRA on embed_tokens or lm_head is not supported"),
    ({**BASE_CONFIG, "target_modules": ["embed_tokens"], "ensure_weight_tying": True}, "ensure_weight_tying"),
])
def test_edge_refusals(config, reason):
    with pytest.raises(AdapterRefused, match=reason):
        build_spec(config, EDGE_TENSORS, num_layers=2, dims=DIMS, max_rank=64)


def test_weight_tying_alone_does_not_refuse_a_layers_only_adapter():
    build_spec({**BASE_CONFIG, "ensure_weight_tying": True}, shapes(), num_layers=2, dims=DIMS, max_rank=64)


CLS_CONFIG = {**BASE_CONFIG, "task_type": "SEQ_CLS", "modules_to_save": ["classifier", "score"]}


def test_a_classification_adapter_brings_its_head():
    spec = build_spec(CLS_CONFIG, {**shapes(), "base_model.model.score.weight": (3, 64)}, num_layers=2, dims=DIMS,
                      max_rank=64)
    assert spec.head == "base_model.model.score.weight" and spec.modules == ("q_proj",)
    assert build_spec(BASE_CONFIG, shapes(), num_layers=2, dims=DIMS, max_rank=64).head is None


@pytest.mark.parametrize("config, tensors, reason", [
    (CLS_CONFIG, shapes(), "task_type SEQ_CLS but the file holds no classification head"),
    (CLS_CONFIG, {**shapes(), "base_model.model.score.weight": (3, 32)}, r"shape \(3, 32\) is not \[labels, 64\]"),
    ({**CLS_CONFIG, "modules_to_save": ["score", "lm_head"]}, shapes(), "a classification adapter may save only its head"),
    ({**BASE_CONFIG, "modules_to_save": ["score"]}, shapes(), "modules_to_save replaces whole base modules"),
    (BASE_CONFIG, {**shapes(), "base_model.model.score.weight": (3, 64)}, "outside the decoder's linear layers"),
])
def test_classification_refusals(config, tensors, reason):
    with pytest.raises(AdapterRefused, match=reason):
        build_spec(config, tensors, num_layers=2, dims=DIMS, max_rank=64)


@pytest.mark.parametrize("config, tensors, reason", [
    # tensors of a module the config does not target: PEFT ignores them
    (BASE_CONFIG, {**shapes(), **shapes("v_proj")}, "layer 0 v_proj: the file holds its LoRA tensors, but"),
    ({**BASE_CONFIG, "layers_to_transform": [0]}, {**shapes(), **shapes(layer=1)}, "layer 1 q_proj: the file holds"),
    ({**BASE_CONFIG, "exclude_modules": ["model.layers.0.self_attn.q_proj"]}, {**shapes(), **shapes(layer=1)},
     "layer 0 q_proj: the file holds"),
    ({**BASE_CONFIG, "target_modules": r".*\.1\.self_attn\.q_proj"}, {**shapes(), **shapes(layer=1)},
     "layer 0 q_proj: the file holds"),
    # a targeted module without tensors starts from its initialisation in PEFT: random B here
    ({**BASE_CONFIG, "init_lora_weights": False}, shapes(), "layer 1 q_proj: adapter_config.json targets it but"),
    # keys PEFT would not load at all
    (BASE_CONFIG, {k.removeprefix("base_model.model."): v for k, v in shapes().items()}, "would load none"),
])
def test_the_file_must_hold_what_peft_would_apply(config, tensors, reason):
    with pytest.raises(AdapterRefused, match=reason):
        build_spec(config, tensors, num_layers=2, dims=DIMS, max_rank=64)


def test_what_peft_targets_by_its_rules_is_accepted():
    two_layers = {**shapes(), **shapes(layer=1)}
    for config in ({**BASE_CONFIG, "target_modules": r".*\.self_attn\.q_proj"},
                   {**BASE_CONFIG, "target_modules": "all-linear", "exclude_modules": ["k_proj", "v_proj", "o_proj",
                                                                                      "gate_proj", "up_proj",
                                                                                      "down_proj"]},
                   {**BASE_CONFIG, "layers_to_transform": [1], "layers_pattern": "layers", "init_lora_weights": False}):
        tensors = shapes(layer=1) if config.get("layers_to_transform") else two_layers
        assert build_spec(config, tensors, num_layers=2, dims=DIMS, max_rank=64).modules == ("q_proj",)
    # a targeted module without tensors and B starting at zero changes nothing in PEFT either
    assert set(build_spec(BASE_CONFIG, shapes(), num_layers=2, dims=DIMS, max_rank=64).ranks) == {(0, "q_proj")}


@pytest.mark.parametrize("change, reason", [
    ({"r": None}, "r=None: a rank is a positive integer"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern\\['q_proj'\\]='4'"),
    ({"rank_pattern": {"q_proj": 0}}, "a rank is a positive integer"),
    ({"lora_alpha": "16"}, "an alpha is a finite number"),
    ({"alpha_pattern": {"(": 3}}, "alpha_pattern key '\\(' is not a regular expression"),
])
def test_unusable_numbers_and_patterns_are_refused(change, reason):
    with pytest.raises(AdapterRefused, match=reason):
        check_config({**BASE_CONFIG, **change}, max_rank=64)


def test_a_truncated_or_damaged_file_is_refused(tmp_path):
    import json
    import struct

    import torch
    from safetensors.torch import save_file

    from hotswap.serve.lora.weights import read_safetensors

    path = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.ones(4, 8), "b": torch.ones(8, 4)}, path)
    assert set(read_safetensors(path)[1]) == {"a", "b"}
    data = path.read_bytes()
    path.write_bytes(data[:-64])  # the last tensor's bytes run past the end
    with pytest.raises(AdapterRefused, match="do not hold its shape .* within the file"):
        read_safetensors(path)
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header["a"]["shape"] = [5, 8]  # more values than its bytes hold
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    with pytest.raises(AdapterRefused, match="tensor a's bytes"):
        read_safetensors(path)
