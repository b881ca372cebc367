"""Sequence-classification adapters (PEFT ``task_type`` SEQ_CLS): their head's logits equal PEFT's
``LlamaForSequenceClassification`` for the same texts, in batches shared with generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import LlamaForSequenceClassification

from hotswap.serve.engine import GenerationRequest, IncompatibleAdapter, InvalidRequest

from .engine_support import (  # noqa: F401
    BASE, PROMPTS, peft_rows, preload, prompt_requests, publish, start_engine, tiny_tokenizer, world)

LABELS = ["negative", "neutral", "positive"]


def save_classifier(base_dir, folder, seed: int, labels: int = 3, targets=("q_proj", "v_proj", "down_proj")):
    model = LlamaForSequenceClassification.from_pretrained(base_dir, num_labels=labels)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                  target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "score" in name:
                p.normal_(0, 0.4)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cls_world(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    sentiment = save_classifier(world.base_dir, root / "sentiment", seed=51)
    (sentiment / "labels.json").write_text(json.dumps(LABELS))
    topic = save_classifier(world.base_dir, root / "topic", seed=52, labels=5, targets=("k_proj", "gate_proj"))
    publish(world, {"sentiment": sentiment, "topic": topic})
    return world


def peft_logits(world, adapter: str, ids: list[int]) -> list[float]:
    model = LlamaForSequenceClassification.from_pretrained(world.base_dir, num_labels=5 if adapter == "topic" else 3)
    model = PeftModel.from_pretrained(model, world.adapter_dirs[adapter]).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].tolist()


def classify(model: str, prompt: int | list[int]) -> GenerationRequest:
    if isinstance(prompt, int):
        return GenerationRequest(prompt=PROMPTS[prompt], model=model, classify=True)
    return GenerationRequest(prompt_token_ids=prompt, model=model, classify=True)


@pytest.mark.parametrize("overrides", [{}, {"native_kernels": False}], ids=["native", "torch"])
def test_classifications_match_peft_beside_generation(cls_world, overrides):
    tok = tiny_tokenizer()
    gen_models = [None, "chat", "sql"]
    want_gen = peft_rows(cls_world, gen_models, prompts=[3, 4, 5], new=8)
    engine = start_engine(cls_world.home, **overrides)
    try:
        preload(engine, ["sentiment", "topic", "chat", "sql"])
        requests = [classify("sentiment", 0), classify("topic", 1), classify("sentiment", 2),
                    *prompt_requests(gen_models, prompts=[3, 4, 5], new=8)]
        outs = engine.generate_sync(requests)
        for out, (model, prompt) in zip(outs[:3], [("sentiment", 0), ("topic", 1), ("sentiment", 2)]):
            want = peft_logits(cls_world, model, tok(PROMPTS[prompt])["input_ids"])
            assert out.classification.logits == pytest.approx(want, abs=1e-4)
            assert out.token_ids == () and out.usage.completion_tokens == 0 and out.finish_reason == "length"
        assert outs[0].classification.labels == tuple(LABELS)  # from labels.json
        assert outs[1].classification.labels == tuple(f"LABEL_{i}" for i in range(5))  # transformers' names
        probs = outs[0].classification.probs
        assert sum(probs) == pytest.approx(1.0) and outs[0].classification.label == LABELS[probs.index(max(probs))]
        assert [list(o.token_ids) for o in outs[3:]] == want_gen  # generation rows untouched beside them
    finally:
        engine.stop_sync()


def test_trailing_padding_is_skipped_as_transformers_pools(cls_world):
    """LlamaForSequenceClassification reads the last token that is not padding: so does the engine."""
    tok = tiny_tokenizer()
    ids = tok(PROMPTS[6])["input_ids"]
    padded = ids + [tok.pad_token_id] * 3
    engine = start_engine(cls_world.home)
    try:
        plain, pad = engine.generate_sync([classify("sentiment", ids), classify("sentiment", padded)])
        assert pad.classification.logits == pytest.approx(peft_logits(cls_world, "sentiment", padded), abs=1e-4)
        assert pad.classification.logits == pytest.approx(plain.classification.logits, abs=1e-5)
        assert pad.usage.prompt_tokens == len(ids)  # the padding is not computed
    finally:
        engine.stop_sync()


def test_mismatched_requests_are_refused_with_the_reason(cls_world, tmp_path):
    engine = start_engine(cls_world.home)
    try:
        with pytest.raises(InvalidRequest, match="tiny@1 is a base: classification needs an adapter"):
            engine.submit(classify(BASE, 0))
        with pytest.raises(InvalidRequest, match="sql@1 has no classification head"):
            engine.generate_sync([classify("sql", 0)])
        with pytest.raises(InvalidRequest, match="sentiment@1 is a sequence-classification adapter"):
            engine.generate_sync(prompt_requests(["sentiment"], new=4))
        with pytest.raises(IncompatibleAdapter, match="sentiment@1 is a classification adapter"):
            engine.generate_sync([classify("sentiment*0.5+sql", 0)])
        [ok] = engine.generate_sync([classify("sentiment", 1)])  # everything else is still served
        assert ok.classification is not None
    finally:
        engine.stop_sync()


@pytest.mark.parametrize("names", [["a", "b"], ["a", "a", "b"], "abc", ["a", "", "b"]])
def test_bad_labels_file_is_refused(cls_world, tmp_path, names):
    """The registry refuses it at publish; the loader checks it again (a registry written before the
    registry checked labels could hold one)."""
    from hotswap.hub import IncompatibleAdapter as RegistryRefused
    from hotswap.serve.lora.spec import AdapterRefused
    from hotswap.serve.lora.weights import read_labels

    folder = tmp_path / "badlabels"
    shutil.copytree(cls_world.adapter_dirs["sentiment"], folder)
    (folder / "labels.json").write_text(json.dumps(names))
    with pytest.raises(RegistryRefused, match="labels.json must list 3 distinct non-empty names"):
        publish(cls_world, {"badlabels": folder})
    with pytest.raises(AdapterRefused, match="labels.json must list 3 distinct non-empty names"):
        read_labels(folder, 3)
