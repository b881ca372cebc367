"""Llama-family bases other than the tests' usual one: each served token for token as transformers
generates, or refused at start with the reason; prompts a base cannot read are refused, not run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from hotswap.hub import Registry
from hotswap.serve.engine import Engine, GenerationRequest, IncompatibleAdapter, InvalidRequest, SamplingParams

from .engine_support import PROMPTS, small_config, tiny_tokenizer

VARIANTS = {
    "mqa": dict(num_key_value_heads=1),
    "gqa-8-heads": dict(num_attention_heads=8, num_key_value_heads=2),
    "head-dim-32": dict(head_dim=32),
    "untied": dict(tie_word_embeddings=False),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}),
    "rope-llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                        rope_theta=500000.0),
    "rope-yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "odd-vocab-eps": dict(vocab_size=333, rms_norm_eps=1e-2),
    "several-eos": dict(eos_token_id=[2, 1], pad_token_id=None),
}
LONGROPE = {"rope_type": "longrope", "long_factor": [1.0, 2, 3, 4, 5, 6, 7, 8],
            "short_factor": [1.0, 1.5, 2, 2, 2, 3, 3, 3], "original_max_position_embeddings": 24}


def save_base(folder: Path, generation: dict | None = None, **overrides) -> Path:
    tok = tiny_tokenizer()
    values = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    values.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**values))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    if generation is not None:
        model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def start(tmp_path: Path, folder: Path) -> Engine:
    registry = Registry(tmp_path / "home")
    registry.publish(folder, name="variant", kind="base")
    registry.close()
    engine = Engine(Registry(tmp_path / "home"), "variant", small_config())
    engine.start_sync()
    return engine


def hf_greedy(folder: Path, ids: list[int], new: int) -> list[int]:
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_llama_variants_match_transformers(tmp_path, variant):
    folder = save_base(tmp_path / "base", **VARIANTS[variant])
    tok = tiny_tokenizer()
    # a long prompt beside short ones (past the scaled ropes' original length), the last one reaching
    # the end of the context
    prompts = [tok(PROMPTS[1])["input_ids"], tok(" ".join(PROMPTS))["input_ids"][:40], tok(PROMPTS[2])["input_ids"]]
    news = [12, 24, 64 - len(prompts[2])]
    engine = start(tmp_path, folder)
    try:
        outs = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(
            max_tokens=new, ignore_eos=True)) for ids, new in zip(prompts, news)])
    finally:
        engine.stop_sync()
    assert [list(o.token_ids) for o in outs] == [hf_greedy(folder, ids, new) for ids, new in zip(prompts, news)]


def test_eos_ids_of_the_generation_config_end_a_request(tmp_path):
    tok = tiny_tokenizer()
    ids = tok(PROMPTS[0])["input_ids"]
    probe = save_base(tmp_path / "probe")
    first = hf_greedy(probe, ids, 3)[2]  # the third token greedy decoding makes: made an end token below
    folder = save_base(tmp_path / "base", generation={"eos_token_id": [tok.eos_token_id, first]})
    engine = start(tmp_path, folder)
    try:
        (out,) = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=8))])
    finally:
        engine.stop_sync()
    assert list(out.token_ids) == hf_greedy(probe, ids, 3) and out.finish_reason == "stop"


def test_longrope_is_refused_at_start(tmp_path):
    # transformers switches to the long factors for a whole forward once any position in it passes
    # the original length: a short sequence batched with a long one would rotate differently
    folder = save_base(tmp_path / "base", rope_scaling=LONGROPE, max_position_embeddings=128)
    with pytest.raises(IncompatibleAdapter, match="longrope"):
        start(tmp_path, folder)


def test_ids_beyond_the_embedding_are_refused_and_spare_the_batch(tmp_path):
    tok = tiny_tokenizer()  # 323 tokens; this base embeds the first 300 only
    engine = start(tmp_path, save_base(tmp_path / "base", vocab_size=300))
    try:
        text = next(p for p in PROMPTS if max(tok(p)["input_ids"]) >= 300)
        running = engine.submit(GenerationRequest(prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=16)))
        for request in (GenerationRequest(prompt_token_ids=[5, 310, 7]), GenerationRequest(prompt=text),
                        GenerationRequest(messages=[{"role": "user", "content": text}]),
                        GenerationRequest(prompt="hi", sampling=SamplingParams(logit_bias=((310, 5.0),)))):
            with pytest.raises(InvalidRequest, match="300"):
                engine.submit(request)
        assert running.result().finish_reason == "length"
    finally:
        engine.stop_sync()
