"""Full fine-tuned models (registry kind "model") served beside the base, within a memory budget."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models as bpe, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hotswap.hub import Registry
from hotswap.serve.engine import CapacityExceeded, GenerationRequest, SamplingParams

from .engine_support import BASE, PROMPTS, save_model, start_engine, tiny_tokenizer, world  # noqa: F401


def hf_greedy(folder, ids, new):
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def models(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("full-models")
    registry = Registry(world.home)
    dirs = {}
    for name, seed in (("full-a", 21), ("full-b", 22)):
        dirs[name] = save_model(root / name, seed=seed)
        registry.publish(dirs[name], name=name, kind="model", base=BASE)
    registry.close()
    return dirs


def test_full_model_served_beside_the_base_and_adapters(world, models):
    ids = tiny_tokenizer()(PROMPTS[0])["input_ids"]
    engine = start_engine(world.home, model_memory_bytes=64 << 20)
    try:
        sp = SamplingParams(max_tokens=8)
        outs = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, model=m, sampling=sp)
                                     for m in ("full-a", None, "full-a@1")])
        assert list(outs[0].token_ids) == hf_greedy(models["full-a"], ids, 8) == list(outs[2].token_ids)
        assert list(outs[1].token_ids) == hf_greedy(world.base_dir, ids, 8)
        assert outs[0].target.kind == "model" and outs[1].target.kind == "base"
        (entry,) = [r for r in engine.residency() if r.kind == "model"]
        assert entry.ref == "full-a@1" and entry.tier == "device" and entry.pins == 0
    finally:
        engine.stop_sync()


def test_models_evicted_lru_within_the_budget(world, models):
    ids = tiny_tokenizer()(PROMPTS[1])["input_ids"]
    # each tiny model is ~0.4 MB of weights + 1 MB of KV: the budget holds one at a time
    engine = start_engine(world.home, model_memory_bytes=2 << 20, kv_cache_bytes=1 << 20)
    try:
        sp = SamplingParams(max_tokens=6)
        streams = [engine.submit(GenerationRequest(prompt_token_ids=ids, model=m, sampling=sp))
                   for m in ("full-a", "full-b", "full-a")]
        outs = [s.result() for s in streams]
        assert list(outs[0].token_ids) == hf_greedy(models["full-a"], ids, 6) == list(outs[2].token_ids)
        assert list(outs[1].token_ids) == hf_greedy(models["full-b"], ids, 6)
        stats = engine.stats()
        assert stats.model_evictions >= 1 and stats.models_loaded <= 1
    finally:
        engine.stop_sync()


def test_model_over_the_budget_is_refused(world, models):
    engine = start_engine(world.home, model_memory_bytes=100_000)
    try:
        with pytest.raises(CapacityExceeded, match="model memory budget"):
            engine.submit(GenerationRequest(prompt="hi", model="full-a"))
    finally:
        engine.stop_sync()


def test_full_model_reuses_its_own_prefixes_never_the_bases(world, models):
    ids = tiny_tokenizer()(" ".join(PROMPTS))["input_ids"]
    engine = start_engine(world.home, model_memory_bytes=64 << 20)
    try:
        run = lambda m: engine.generate_sync([GenerationRequest(  # noqa: E731
            prompt_token_ids=ids, model=m, sampling=SamplingParams(max_tokens=6))])[0]
        assert [run(m).usage.cached_tokens for m in (None, "full-a", "full-a", None)] == [0, 0, 80, 80]
        assert list(run("full-a").token_ids) == hf_greedy(models["full-a"], ids, 6)
    finally:
        engine.stop_sync()


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of its own: the same text reads as other ids than under the tiny base's."""
    tok = Tokenizer(bpe.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["zebras and yaks graze", "hello there general"] * 5, trainers.BpeTrainer(
        vocab_size=290, show_progress=False, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_a_model_without_a_tokenizer_reads_text_as_its_own_base_does(world, tmp_path):
    # published on another base, it is served beside this one: its text is its base's ids, not the served base's
    tok = other_tokenizer()
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    torch.manual_seed(6)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")  # weights and config, no tokenizer
    registry = Registry(world.home)
    registry.publish(tmp_path / "other", name="other-base", kind="base")
    registry.publish(tmp_path / "model", name="other-model", kind="model", base="other-base")
    registry.close()
    ids = tok("hello there zebras")["input_ids"]
    assert ids != tiny_tokenizer()("hello there zebras")["input_ids"]
    engine = start_engine(world.home, model_memory_bytes=64 << 20)
    try:
        tokenized = engine.tokenize(GenerationRequest(prompt="hello there zebras", model="other-model"))
        assert list(tokenized.token_ids) == ids
        (out,) = engine.generate_sync([GenerationRequest(prompt="hello there zebras", model="other-model",
                                                         sampling=SamplingParams(max_tokens=6, ignore_eos=True))])
    finally:
        engine.stop_sync()
    assert list(out.token_ids) == hf_greedy(tmp_path / "model", ids, 6)


def test_the_budget_counts_weights_in_the_served_dtype(world, tmp_path):
    # stored in bfloat16, served in float32: twice the bytes of its files
    folder = save_model(tmp_path / "half", seed=23)
    LlamaForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    registry = Registry(world.home)
    registry.publish(folder, name="full-half", kind="model", base=BASE)
    registry.close()
    engine = start_engine(world.home, model_memory_bytes=64 << 20, kv_cache_bytes=1 << 20)
    try:
        engine.load_future("full-half").result(timeout=30)
        (entry,) = [r for r in engine.residency() if r.ref == "full-half@1"]
        loaded = entry.size_bytes
    finally:
        engine.stop_sync()
    engine = start_engine(world.home, model_memory_bytes=loaded - 1, kv_cache_bytes=1 << 20)
    try:
        with pytest.raises(CapacityExceeded, match="model memory budget"):
            engine.submit(GenerationRequest(prompt="hi", model="full-half"))
    finally:
        engine.stop_sync()
