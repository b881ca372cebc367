"""Merging adapters into a new registry entry: the tensors are the documented weighted combination."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hotswap.train.errors import MergeError
from hotswap.train.merge import merge_adapters

from .conftest import TINY_SOURCE, save_tiny_chat_base

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def _publish_adapter(registry, base_dir, tmp_path, name, seed, rank=4, alpha=8, dora=False):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.name_or_path = TINY_SOURCE
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        use_dora=dora)
    folder = tmp_path / name
    get_peft_model(model, config).save_pretrained(folder, save_embedding_layers=False)
    return registry.publish(folder, name=name, kind="adapter", base="tiny", task="colours", language="en").version


def _factors(registry, ref):
    tensors = load_file(registry.open(ref).path / "adapter_model.safetensors")
    return tensors[f"{MODULE}.lora_A.weight"], tensors[f"{MODULE}.lora_B.weight"]


@pytest.fixture
def two(registry, tiny_chat_dir, tmp_path):
    return (_publish_adapter(registry, tiny_chat_dir, tmp_path, "site-a", seed=1),
            _publish_adapter(registry, tiny_chat_dir, tmp_path, "site-b", seed=2, alpha=4))


def test_cat_is_exactly_the_weighted_sum_of_updates(registry, two):
    weights = [0.25, 0.75]
    merged = merge_adapters(registry, ["site-a", "site-b"], weights, "cat", "fedavg").version
    assert merged.kind == "adapter" and merged.metadata.rank == 8 and merged.metadata.alpha == 8
    a_m, b_m = _factors(registry, merged.ref)
    expected = sum(w * (alpha / 4) * (b @ a) for w, alpha, (a, b) in
                   zip(weights, (8, 4), (_factors(registry, "site-a"), _factors(registry, "site-b"))))
    torch.testing.assert_close(b_m @ a_m, expected, rtol=1e-5, atol=1e-6)  # scaling of the merged adapter is 1
    lineage = merged.metadata.lineage
    assert [p["ref"] for p in lineage["merged_from"]] == ["site-a@1", "site-b@1"]
    assert [p["weight"] for p in lineage["merged_from"]] == weights and lineage["method"] == "merge:cat"


def test_linear_weights_each_factor_by_root_of_weight_times_scaling(registry, two):
    weights = [0.5, 0.3]
    merged = merge_adapters(registry, ["site-a", "site-b"], weights, "linear", "mix").version
    assert merged.metadata.rank == 4 and merged.metadata.alpha == 4
    (a0, b0), (a1, b1) = _factors(registry, "site-a"), _factors(registry, "site-b")
    root = [math.sqrt(0.5 * 8 / 4), math.sqrt(0.3 * 4 / 4)]
    a_m, b_m = _factors(registry, merged.ref)
    torch.testing.assert_close(a_m, root[0] * a0 + root[1] * a1)
    torch.testing.assert_close(b_m, root[0] * b0 + root[1] * b1)


def test_ties_and_dare_publish_and_dare_is_seeded(registry, two):
    ties = merge_adapters(registry, ["site-a", "site-b"], [1.0, 1.0], "ties", "ties-mix", density=0.5).version
    assert ties.metadata.lineage["density"] == 0.5
    first = merge_adapters(registry, ["site-a", "site-b"], [0.5, 0.5], "dare_linear", "dare-mix", seed=7)
    again = merge_adapters(registry, ["site-a", "site-b"], [0.5, 0.5], "dare_linear", "dare-mix", seed=7)
    assert first.created and not again.created  # same seed, same bytes
    other = merge_adapters(registry, ["site-a", "site-b"], [0.5, 0.5], "dare_linear", "dare-mix", seed=8)
    assert other.created and other.version.version == 2


def test_refusals(registry, two, tiny_chat_dir, tmp_path):
    with pytest.raises(MergeError, match="2 adapters but 1 weights"):
        merge_adapters(registry, ["site-a", "site-b"], [1.0], "linear", "x")
    for weights in ([float("nan"), 0.5], [float("inf"), 0.5]):
        with pytest.raises(MergeError, match="weights must be finite numbers"):
            merge_adapters(registry, ["site-a", "site-b"], weights, "cat", "x")
    with pytest.raises(MergeError, match="not one of"):
        merge_adapters(registry, ["site-a", "site-b"], [1.0, 1.0], "svd", "x")
    with pytest.raises(MergeError, match="tiny@1 is a base"):
        merge_adapters(registry, ["site-a", "tiny"], [1.0, 1.0], "linear", "x")
    _publish_adapter(registry, tiny_chat_dir, tmp_path, "dora", seed=3, dora=True)
    with pytest.raises(MergeError, match="DoRA"):
        merge_adapters(registry, ["site-a", "dora"], [1.0, 1.0], "linear", "x")
    other_dir = save_tiny_chat_base(tmp_path / "other-base", seed=5)
    registry.publish(other_dir, name="other", kind="base", source="org/other")
    model_dir = tmp_path / "on-other"
    model = AutoModelForCausalLM.from_pretrained(other_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(model_dir)
    registry.publish(model_dir, name="on-other", kind="adapter", base="other")
    with pytest.raises(MergeError, match="different bases"):
        merge_adapters(registry, ["site-a", "on-other"], [1.0, 1.0], "linear", "x")
