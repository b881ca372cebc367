"""/v1/classify (vLLM's /classify): a sequence-classification adapter's labels over HTTP, with the
same tenant rules and errors as generation, counted in the metrics."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForSequenceClassification

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
    full = LlamaForSequenceClassification.from_pretrained(base_dir, num_labels=2, id2label={0: "no", 1: "yes"},
                                                          label2id={"no": 0, "yes": 1})
    full.save_pretrained(root / "acme-intent")  # no tokenizer files: it reads text as its base does
    registry.publish(root / "acme-intent", name="acme-intent", kind="model", base=BASE)
    registry.close()
    app, _ = make_app(root / "home")
    with running_client(app) as client:
        yield client, type("World", (), {"base_dir": base_dir, "adapter_dirs": {"sentiment": folder},
                                         "intent_dir": root / "acme-intent"})


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


def test_classify_with_a_full_classifier_model(classify_server):
    """A full fine-tuned sequence classifier (kind model) answers on the same endpoint, its labels from
    its config; generation requests to it are refused."""
    client, world = classify_server
    text = "where is my parcel"
    reply = client.post("/v1/classify", headers=ACME, json={"model": "acme-intent", "input": text})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    model = LlamaForSequenceClassification.from_pretrained(world.intent_dir).eval()
    with torch.inference_mode():
        want = model(**tiny_tokenizer()(text, return_tensors="pt")).logits[0].softmax(-1).tolist()
    assert body["model"] == "acme-intent@1" and body["data"][0]["num_classes"] == 2
    assert body["data"][0]["probs"] == pytest.approx(want, abs=1e-4)
    assert body["data"][0]["label"] == ["no", "yes"][max(range(2), key=want.__getitem__)]
    generate = client.post("/v1/completions", headers=ACME, json={"model": "acme-intent", "prompt": "hi"})
    assert generate.status_code == 400 and "is a sequence-classification model" in generate.text


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
    too_long = client.post("/v1/classify", headers=ACME, json={"model": "acme-sentiment", "input": "word " * 400})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"
    # more inputs than the queue holds (64 here): refused naming the field they came in
    many = client.post("/v1/classify", headers=ACME, json={"model": "acme-sentiment", "input": ["hi"] * 65})
    assert many.status_code == 400 and many.json()["error"]["param"] == "input", many.text[:300]
    assert "65 inputs" in many.json()["error"]["message"]


def test_models_and_adapters_list_a_classifiers_labels(classify_server):
    """An app finds what a classifier answers with before calling it: /v1/models and the admin listing
    carry each classifier's label names (adapters' labels.json, full models' id2label), and no
    labels for what generates."""
    client, _ = classify_server
    cards = {c["id"]: c for c in client.get("/v1/models", headers=ADMIN).json()["data"]}
    assert cards["acme-sentiment"]["labels"] == cards["acme-sentiment@1"]["labels"] == ["negative", "neutral",
                                                                                         "positive"]
    assert cards["acme-intent"]["labels"] == ["no", "yes"]
    assert cards[BASE]["labels"] is None and cards["acme-sql"]["labels"] is None
    one = client.get("/v1/models/acme-intent@1", headers=ACME).json()
    assert one["labels"] == ["no", "yes"]
    infos = {a["ref"]: a for a in client.get("/v1/adapters", headers=ADMIN).json()["data"]}
    assert infos["acme-sentiment@1"]["labels"] == ["negative", "neutral", "positive"]
    assert infos["acme-intent@1"]["labels"] == ["no", "yes"] and infos["acme-sql@1"]["labels"] is None
