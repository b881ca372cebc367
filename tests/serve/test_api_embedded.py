"""The server on the real embedded base (SmolLM2-135M-Instruct): the openai client gets a sensible answer,
an adapter whose update is zero answers exactly as the base does, and the shipped SQL adapter scores
SQL answers higher than the base does."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from hotswap.hub import Registry
from hotswap.serve.api import ServerSettings, create_app
from hotswap.serve.engine import Engine, EngineConfig

from .api_support import uvicorn_server

pytestmark = pytest.mark.integration


def test_openai_client_on_the_embedded_base(embedded_home, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    registry = Registry(embedded_home)
    base = registry.open("smollm2")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base.path),
                           LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.save_pretrained(tmp_path / "zero")  # PEFT's default init: B = 0, so the adapter changes nothing
    registry.publish(tmp_path / "zero", name="zero-delta", base="smollm2", task="test")

    config = EngineConfig(device="cpu", kv_cache_bytes=64 << 20, lora_capacity_bytes=32 << 20)
    app = create_app(Engine(registry, "smollm2", config), registry, ServerSettings())
    with uvicorn_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        base_answer = client.chat.completions.create(model="smollm2", messages=question, max_tokens=8, temperature=0)
        assert "Paris" in base_answer.choices[0].message.content
        adapter_answer = client.chat.completions.create(model="zero-delta", messages=question, max_tokens=8,
                                                        temperature=0)
        assert adapter_answer.model == "zero-delta@1"
        assert adapter_answer.choices[0].message.content == base_answer.choices[0].message.content


def test_scoring_texts_shows_the_shipped_adapter_fits_its_domain(embedded_home):
    """echo + logprobs + max_tokens 0 (an evaluation harness's loglikelihood request) on the SQL
    adapter's held-out answers: the adapter gives them a higher log-likelihood than the base."""
    artifact = Path(__file__).parents[2] / "adapters" / "sql" / "artifact"
    registry = Registry(embedded_home)
    registry.publish(artifact, name="shipped-sql", base="smollm2", task="text-to-sql")
    rows = [json.loads(line) for line in (artifact.parent / "eval.jsonl").read_text().splitlines()[:4]]
    config = EngineConfig(device="cpu", kv_cache_bytes=64 << 20, lora_capacity_bytes=32 << 20)
    app = create_app(Engine(registry, "smollm2", config), registry, ServerSettings())
    with uvicorn_server(app) as url:
        def loglikelihood(model: str, text: str) -> float:
            body = {"model": model, "prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0}
            reply = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
            values = reply["choices"][0]["logprobs"]["token_logprobs"]
            assert values[0] is None and reply["usage"]["completion_tokens"] == 0
            return sum(values[1:])

        for row in rows:  # measured: about -52 against -86 on the first three
            assert loglikelihood("shipped-sql", row["completion"]) > loglikelihood("smollm2", row["completion"])
