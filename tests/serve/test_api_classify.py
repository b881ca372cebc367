"""/v1/classify (vLLM's /classify): a sequence-classification adapter's labels over HTTP, with the
same tenant rules and errors as generation, counted in the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from hotswap.hub import Registry

from .api_support import (
    ACME, ADMIN, BASE, GLOBEX, make_app, running_client, save_adapter, save_base, tiny_tokenizer)
from .test_api_metrics import scrape, value
from .test_engine_classify import peft_logits, save_classifier


@pytest.fixture(scope="module")
def classify_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-classify")
    base_dir = save_base(root / "base")
    registry = Registry(root / "home")
    registry.publish(base_dir, name=BASE, kind="base")
    folder = save_classifier(base_dir, root / "acme-sentiment", seed=61)
    (folder / "labels.json").write_text(json.dumps(["negative", "neutral", "positive"]))
    registry.publish(folder, name="acme-sentiment", kind="adapter", base=BASE)
    registry.publish(save_adapter(base_dir, root / "acme-sql", seed=62), name="acme-sql", kind="adapter", base=BASE)
    registry.close()
    app, _ = make_app(root / "home")
    with running_client(app) as client:
        yield client, type("World", (), {"base_dir": base_dir, "adapter_dirs": {"sentiment": folder}})


def test_classify_texts_and_token_ids(classify_server):
    client, world = classify_server
    texts = ["this tiny model is great", "select name from users"]
    ids = tiny_tokenizer()(texts[1])["input_ids"]
    body = client.post("/v1/classify", headers=ACME, json={"model": "acme-sentiment", "input": texts}).json()
    assert body["object"] == "list" and body["model"] == "acme-sentiment@1" and len(body["data"]) == 2
    for i, (row, text) in enumerate(zip(body["data"], texts)):
        want = peft_logits(world, "sentiment", tiny_tokenizer()(text)["input_ids"])
        assert row["index"] == i and row["num_classes"] == 3
        assert row["probs"] == pytest.approx(torch.tensor(want).softmax(-1).tolist(), abs=1e-4)
        assert row["label"] == ["negative", "neutral", "positive"][max(range(3), key=want.__getitem__)]
    assert body["usage"]["prompt_tokens"] == sum(len(tiny_tokenizer()(t)["input_ids"]) for t in texts)
    assert body["usage"]["completion_tokens"] == 0
    by_ids = client.post("/classify", headers=ADMIN, json={"model": "acme-sentiment", "input": ids}).json()
    assert by_ids["data"][0]["probs"] == pytest.approx(body["data"][1]["probs"], abs=1e-6)
    samples = scrape(client)
    assert value(samples, "hotswap_requests_total", model="acme-sentiment@1", endpoint="classify",
                 finish_reason="length") == 3


def test_classify_refusals(classify_server):
    client, _ = classify_server
    other_tenant = client.post("/v1/classify", headers=GLOBEX, json={"model": "acme-sentiment", "input": "x"})
    assert other_tenant.status_code == 403
    base = client.post("/v1/classify", headers=ADMIN, json={"model": BASE, "input": "hello"})
    assert base.status_code == 400 and "classification needs an adapter" in base.text
    no_head = client.post("/v1/classify", headers=ACME, json={"model": "acme-sql", "input": "hello"})
    assert no_head.status_code == 400 and "has no classification head" in no_head.text
    generate = client.post("/v1/completions", headers=ACME, json={"model": "acme-sentiment", "prompt": "hi"})
    assert generate.status_code == 400 and "sequence-classification adapter" in generate.text
    assert client.post("/v1/classify", headers=ACME, json={"model": "acme-sentiment", "input": []}).status_code == 400
    unknown = client.post("/v1/classify", headers=ADMIN, json={"model": "nope", "input": "hello"})
    assert unknown.status_code == 404
