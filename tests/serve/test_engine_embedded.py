"""On the embedded base (SmolLM2-135M-Instruct): a mixed batch is token-identical to PEFT alone."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hotswap.hub import Registry
from hotswap.serve.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

pytestmark = pytest.mark.integration

NEW = 16


def test_mixed_batch_on_the_embedded_base_matches_peft(embedded_home, tmp_path):
    registry = Registry(embedded_home)
    base_dir = registry.open("smollm2").path
    specs = {"wide": LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
             "narrow": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                  init_lora_weights=False)}
    for i, (name, cfg) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.05)
        model.save_pretrained(tmp_path / name)
        registry.publish(tmp_path / name, name=f"it-{name}", kind="adapter", base="smollm2")
    engine = Engine(registry, "smollm2", EngineConfig(device="cpu", kv_cache_bytes=64 << 20))
    engine.start_sync()
    try:
        chats = [[{"role": "user", "content": q}] for q in
                 ("Write a SQL query that counts users.", "What is the capital of France?", "Say hello in Spanish.")]
        models = ["it-wide", "it-narrow", None]
        sp = SamplingParams(max_tokens=NEW)
        outs = engine.generate_sync([GenerationRequest(messages=c, model=m, sampling=sp) for c, m in zip(chats, models)])
        tok = engine.tokenizer
        for chat, model_ref, out in zip(chats, models, outs):
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            ref_model = AutoModelForCausalLM.from_pretrained(base_dir)
            if model_ref:
                ref_model = PeftModel.from_pretrained(ref_model, tmp_path / model_ref.removeprefix("it-"))
            with torch.inference_mode():
                ref = ref_model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                                do_sample=False)[0, ids.shape[1]:].tolist()
            assert list(out.token_ids) == ref, f"{model_ref or 'base'} differs from PEFT alone"
        assert outs[0].token_ids != outs[2].token_ids  # the adapter does change the output
    finally:
        engine.stop_sync()
        registry.close()


@pytest.mark.parametrize("lora_dtype", [None, "bfloat16"], ids=["float32-rows", "bfloat16-rows"])
def test_the_shipped_classifier_serves_its_recorded_accuracy(embedded_home, tmp_path, lora_dtype):
    """adapters/ticket-topic (a classification recipe's artifact) on /v1/classify's engine path: the
    labels of its held-out texts score what its training run recorded; with its rows rounded to
    bfloat16 too (the head stays float32)."""
    import json
    import shutil
    from pathlib import Path

    shipped = Path(__file__).parents[2] / "adapters" / "ticket-topic"
    folder = tmp_path / "ticket-topic"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "labels.json"):
        shutil.copy2(shipped / "artifact" / name, folder / name)
    registry = Registry(embedded_home)
    registry.publish(folder, name="it-ticket-topic", kind="adapter", base="smollm2")
    rows = [json.loads(line) for line in (shipped / "eval.jsonl").read_text().splitlines()]
    engine = Engine(registry, "smollm2", EngineConfig(device="cpu", kv_cache_bytes=64 << 20, lora_dtype=lora_dtype))
    engine.start_sync()
    try:
        outs = engine.generate_sync([GenerationRequest(prompt=r["prompt"], model="it-ticket-topic", classify=True)
                                     for r in rows])
        accuracy = sum(o.classification.label == r["completion"] for o, r in zip(outs, rows)) / len(rows)
        recorded = json.loads((shipped / "artifact" / "metrics.json").read_text())["score"]
        assert accuracy == pytest.approx(recorded)
        assert set(outs[0].classification.labels) == {"billing", "shipping", "returns", "account"}
    finally:
        engine.stop_sync()
        registry.close()
