"""Full fine-tuned sequence classifiers (registry kind model, ``LlamaForSequenceClassification``):
served beside the base on their own worker; their head's logits equal transformers' for the same
texts, and requests that do not fit them are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForSequenceClassification

from hotswap.hub import Registry
from hotswap.serve.engine import GenerationRequest, InvalidRequest, SamplingParams

from .engine_support import (  # noqa: F401
    BASE, PROMPTS, peft_rows, prompt_requests, save_model, start_engine, tiny_tokenizer, world)

LABELS = ["cancel", "refund", "track"]


@pytest.fixture(scope="module")
def classifiers(world, tmp_path_factory):
    """``intent-full``: every weight of the base moved and a head over LABELS (a full fine-tune's shape);
    ``plain-full``: a full fine-tuned causal LM, which has no classification head."""
    root = tmp_path_factory.mktemp("full-classifiers")
    model = LlamaForSequenceClassification.from_pretrained(
        world.base_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    torch.manual_seed(61)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / "intent")
    tiny_tokenizer().save_pretrained(root / "intent")
    registry = Registry(world.home)
    registry.publish(root / "intent", name="intent-full", kind="model", base=BASE)
    registry.publish(save_model(root / "plain", seed=23), name="plain-full", kind="model", base=BASE)
    registry.close()
    return root


def hf_logits(folder, ids: list[int]) -> list[float]:
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].tolist()


@pytest.mark.parametrize("overrides", [{}, {"native_kernels": False}], ids=["native", "torch"])
def test_a_full_classifier_matches_transformers_beside_base_generation(world, classifiers, overrides):
    tok = tiny_tokenizer()
    want_gen = peft_rows(world, [None], prompts=[3], new=8)
    engine = start_engine(world.home, model_memory_bytes=64 << 20, **overrides)
    try:
        requests = [GenerationRequest(prompt=PROMPTS[i], model="intent-full", classify=True) for i in (0, 1, 2)]
        outs = engine.generate_sync([*requests, *prompt_requests([None], prompts=[3], new=8)])
        for out, i in zip(outs[:3], (0, 1, 2)):
            want = hf_logits(classifiers / "intent", tok(PROMPTS[i])["input_ids"])
            assert out.classification.logits == pytest.approx(want, abs=1e-4)
            assert out.classification.labels == tuple(LABELS)  # config.json's id2label
            assert out.target.kind == "model" and out.target.ref == "intent-full@1" and out.token_ids == ()
        assert [list(outs[3].token_ids)] == want_gen
        # trailing padding: pooled at the last token that is not the model's pad token, as transformers pools
        padded = tok(PROMPTS[4])["input_ids"] + [tok.pad_token_id] * 2
        [out] = engine.generate_sync([GenerationRequest(prompt_token_ids=padded, model="intent-full", classify=True)])
        assert out.classification.logits == pytest.approx(hf_logits(classifiers / "intent", padded), abs=1e-4)
        assert out.usage.prompt_tokens == len(padded) - 2
    finally:
        engine.stop_sync()


def test_requests_a_full_model_cannot_answer_are_refused(world, classifiers):
    engine = start_engine(world.home, model_memory_bytes=64 << 20)
    try:
        with pytest.raises(InvalidRequest, match="intent-full@1 is a sequence-classification model: send it "
                                                 "classification requests"):
            engine.submit(GenerationRequest(prompt=PROMPTS[0], model="intent-full",
                                            sampling=SamplingParams(max_tokens=4)))
        with pytest.raises(InvalidRequest, match="plain-full@1 has no classification head: classification needs an "
                                                 "adapter .* or a full sequence-classification model"):
            engine.submit(GenerationRequest(prompt=PROMPTS[0], model="plain-full", classify=True))
        [ok] = engine.generate_sync([GenerationRequest(prompt=PROMPTS[1], model="intent-full", classify=True)])
        assert ok.classification.label in LABELS  # everything else is still served
    finally:
        engine.stop_sync()
