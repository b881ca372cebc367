"""Rule 8 on the real embedded base: the GGUF is dequantized into a base that loads with
transformers and computes what the GGUF-loaded model computes; a plain PEFT adapter made
against it publishes with its base matched from `base_model_name_or_path`."""

import json

import pytest
import torch

from hotswap.hub import Registry
from hotswap.hub.importers import EMBEDDED_SOURCE_ID, embedded_gguf

pytestmark = pytest.mark.integration


def test_embedded_base_round_trip_and_plain_peft_adapter(embedded_home, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = Registry(embedded_home)
    base = registry.resolve("smollm2")
    assert base.kind == "base" and base.metadata.source == EMBEDDED_SOURCE_ID
    snap = registry.open(base)
    config = json.loads((snap.path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(snap.path)
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    model = AutoModelForCausalLM.from_pretrained(snap.path, dtype=torch.float32)
    gguf = embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)

    model.name_or_path = EMBEDDED_SOURCE_ID  # as PEFT records it when the base comes from the Hub
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    published = registry.publish(tmp_path / "adapter", name="demo-lora", task="demo")
    assert published.version.metadata.base == base.ref
    assert published.version.metadata.base_fingerprint == base.metadata.fingerprint
