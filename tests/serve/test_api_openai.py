"""The OpenAI-compatible endpoints on the real engine: completions, chat, models, model selection."""

from __future__ import annotations

import torch
from .api_support import ADMIN, ACME, BASE, client, served, store  # noqa: F401 - fixtures
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

GREEDY = {"temperature": 0, "max_tokens": 10, "ignore_eos": True}


def complete(client, model: str, prompt="select name from users", headers=ADMIN, **extra) -> dict:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY, **extra}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_has_openai_shape_and_usage(client):
    body = complete(client, BASE)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny@1"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert isinstance(choice["text"], str) and choice["text"]
    usage = body["usage"]
    assert usage["completion_tokens"] == 10 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_model_selects_base_adapter_version_alias_and_full_model(client):
    served_by = {m: complete(client, m)["model"] for m in
                 [BASE, "acme-sql", "acme-sql@1", "acme-sql@2", "acme-sql@prod", "tiny-ft"]}
    assert served_by == {BASE: "tiny@1", "acme-sql": "acme-sql@2", "acme-sql@1": "acme-sql@1",
                         "acme-sql@2": "acme-sql@2", "acme-sql@prod": "acme-sql@1", "tiny-ft": "tiny-ft@1"}
    texts = {m: complete(client, m)["choices"][0]["text"] for m in [BASE, "acme-sql@1", "acme-sql@2", "tiny-ft"]}
    assert len(set(texts.values())) == 4, texts  # each one's own weights answer
    assert complete(client, "acme-sql@prod")["choices"][0]["text"] == texts["acme-sql@1"]


def test_adapter_answer_matches_peft(client, store):
    """The server's greedy output for an adapter is PEFT's, token for token (through the tokenizer)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(store.base_dir)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(store.base_dir), store.adapters["acme-sql@2"])
    ids = tokenizer("select name from users", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = tokenizer.decode(out[0, ids.shape[1]:])
    # Random weights emit bytes that are not UTF-8: a character still incomplete at the end reads as
    # U+FFFD in the answer, as decode() writes it
    assert complete(client, "acme-sql@2")["choices"][0]["text"] == expected


def test_prompt_forms_n_and_echo(client):
    many = complete(client, BASE, prompt=["hello world", "select name"])
    assert [c["index"] for c in many["choices"]] == [0, 1]
    single = [complete(client, BASE, prompt=p)["choices"][0]["text"] for p in ["hello world", "select name"]]
    assert [c["text"] for c in many["choices"]] == single
    assert many["usage"]["completion_tokens"] == 20

    sampled = complete(client, BASE, prompt="hello world", n=3, temperature=1.0, seed=7)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    assert sampled["usage"]["completion_tokens"] == 30
    again = complete(client, BASE, prompt="hello world", n=3, temperature=1.0, seed=7)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in sampled["choices"]]  # seeded
    # more choices than run at once (8 here): the rest wait in the queue (64 here)
    wide = complete(client, BASE, prompt=["hello world", "select name"], n=24, max_tokens=1)
    assert [c["index"] for c in wide["choices"]] == list(range(48))
    past = client.post("/v1/completions", json={"model": BASE, "prompt": "hi", "n": 65}, headers=ADMIN)
    assert past.status_code == 400 and past.json()["error"]["param"] == "n"
    assert "max_queue 64" in past.json()["error"]["message"]

    echoed = complete(client, BASE, prompt="hello world", echo=True)
    plain = complete(client, BASE, prompt="hello world")
    assert echoed["choices"][0]["text"] == "hello world" + plain["choices"][0]["text"]


def test_token_id_prompts(client):
    by_text = complete(client, BASE, prompt="hello")
    by_ids = complete(client, BASE, prompt=[[40, 41, 42], [43, 44]])
    assert by_ids["usage"]["prompt_tokens"] == 5 and len(by_ids["choices"]) == 2
    assert complete(client, BASE, prompt=[40, 41, 42])["choices"][0]["text"] == by_ids["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] >= 1


def test_stop_string_ends_the_choice(client):
    text = complete(client, "acme-sql@1")["choices"][0]["text"]
    stop = text[3:5]
    assert stop and stop.strip(), text
    body = complete(client, "acme-sql@1", stop=[stop])
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == text[: text.index(stop)]


def test_chat_completion_shape_and_template(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    response = client.post("/v1/chat/completions", headers=ACME,
                           json={"model": "acme-chat", "messages": messages, **GREEDY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "acme-chat@1"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    # the prompt is the chat template's rendering: a system and a user turn plus the assistant opener
    assert body["usage"]["prompt_tokens"] > 10 and body["usage"]["completion_tokens"] == 10
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    joined = client.post("/v1/chat/completions", headers=ACME,
                         json={"model": "acme-chat", "messages": parts, **GREEDY}).json()
    plain = client.post("/v1/chat/completions", headers=ACME,
                        json={"model": "acme-chat", "messages": [messages[1]], **GREEDY}).json()
    assert joined["choices"][0]["message"] == plain["choices"][0]["message"]


def test_chat_default_max_tokens_and_max_completion_tokens(client):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True}
    limited = client.post("/v1/chat/completions", headers=ADMIN, json=body | {"max_completion_tokens": 3}).json()
    assert limited["usage"]["completion_tokens"] == 3
    # no max_tokens: the server's default (256), kept to half the context (256 here) so the prompt fits
    default = client.post("/v1/chat/completions", headers=ADMIN, json=body)
    assert default.status_code == 200, default.text
    assert default.json()["usage"]["completion_tokens"] == 128


def test_a_long_chat_without_max_tokens_gets_the_rest_of_the_context(client):
    """The default (128 here) does not fit beside this prompt: the chat is answered up to the context's end,
    as vLLM and OpenAI answer it, not refused for a max_tokens the client never sent."""
    body = {"model": BASE, "messages": [{"role": "user", "content": "hello " * 60}], "temperature": 0,
            "ignore_eos": True}
    prompt = client.post("/tokenize", headers=ADMIN, json=body).json()["count"]
    assert 0 < 256 - prompt < 128, prompt
    answered = client.post("/v1/chat/completions", headers=ADMIN, json=body)
    assert answered.status_code == 200, answered.text
    # measured before it is queued: a chat that is served is not counted among the engine's refusals
    assert "PromptTooLong" not in client.get("/metrics", headers=ADMIN).text
    assert answered.json()["usage"] == answered.json()["usage"] | {"prompt_tokens": prompt,
                                                                   "completion_tokens": 256 - prompt}
    # a limit the client did set is still held to: too long is a 400 naming the prompt's field
    refused = client.post("/v1/chat/completions", headers=ADMIN, json=body | {"max_tokens": 128})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    too_long = client.post("/v1/chat/completions", headers=ADMIN,
                           json=body | {"messages": [{"role": "user", "content": "hello " * 300}]})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "messages"


def test_stream_options_need_a_stream(client):
    for path, body in (("/v1/completions", {"prompt": "hello"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        response = client.post(path, headers=ADMIN, json=body | {"model": BASE, "max_tokens": 2,
                                                                  "stream_options": {"include_usage": True}})
        assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options", response.text


def test_explicit_nulls_read_as_defaults(client):
    """OpenAI's reference marks n, stream, echo, logprobs and stream_options.include_usage nullable, and
    clients that fill every parameter send null for "not given" (openai's `n=None`)."""
    nulls = {"n": None, "stream": None, "min_tokens": None, "ignore_eos": None, "seed": None, "stop": None}
    body = complete(client, BASE, prompt="hello world", echo=None, logprobs=None, **nulls)
    [choice] = body["choices"]
    assert choice["logprobs"] is None and not choice["text"].startswith("hello world")
    chat = client.post("/v1/chat/completions", headers=ADMIN, json={
        "model": BASE, "messages": [{"role": "user", "content": "hi"}], "logprobs": None, "top_logprobs": None,
        "add_generation_prompt": None, "max_completion_tokens": None, **GREEDY, **nulls})
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1 and chat.json()["choices"][0]["logprobs"] is None
    streamed = client.post("/v1/completions", headers=ADMIN, json={
        "model": BASE, "prompt": "hi", **GREEDY, "stream": True, "stream_options": {"include_usage": None}})
    assert streamed.status_code == 200, streamed.text
    assert streamed.text.endswith("data: [DONE]\n\n") and '"usage"' not in streamed.text


def test_a_combination_of_eight_adapters_fits_in_model(client):
    """README: up to 8 adapters per combination; their references together run past one reference's length."""
    parts = ["acme-sql@prod", "acme-sql@2", "acme-chat@latest", "acme-chat@1"] * 2
    model = "+".join(f"{ref}*0.125" for ref in parts)
    assert len(model) > 129
    body = complete(client, model, max_tokens=2)
    assert body["model"].split("+") == [f"{ref}*0.125" for ref in ["acme-sql@1", "acme-sql@2", "acme-chat@1",
                                                                   "acme-chat@1"] * 2]
    nine = client.post("/v1/completions", headers=ADMIN, json={"model": model + "+acme-sql", "prompt": "hi"})
    assert nine.status_code == 400 and "at most 8" in nine.json()["error"]["message"]


def test_models_lists_base_adapters_versions_aliases_and_full_models(client):
    response = client.get("/v1/models", headers=ADMIN)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    cards = {m["id"]: m for m in body["data"]}
    assert cards[BASE] == cards[BASE] | {"object": "model", "owned_by": "hotswap", "root": "tiny@1", "parent": None,
                                         "kind": "base", "max_model_len": 256}
    assert cards[BASE]["versions"] == [1] and cards[BASE]["aliases"] == {"latest": 1}  # the served version's
    sql = cards["acme-sql"]
    assert sql["root"] == "acme-sql@2" and sql["parent"] == BASE and sql["kind"] == "adapter"
    assert sql["versions"] == [1, 2] and sql["aliases"] == {"latest": 2, "prod": 1}
    assert cards["acme-sql@prod"]["root"] == "acme-sql@1" and cards["acme-sql@1"]["root"] == "acme-sql@1"
    assert cards["tiny-ft"]["kind"] == "model" and cards["tiny-ft"]["parent"] is None
    assert "other-fit" not in cards and "other" not in cards  # made for another base: not servable here
    assert all(isinstance(m["created"], int) for m in body["data"])


def test_retrieve_one_model(client):
    response = client.get("/v1/models/acme-sql@prod", headers=ADMIN)
    assert response.status_code == 200 and response.json()["root"] == "acme-sql@1"
    missing = client.get("/v1/models/acme-sqk", headers=ADMIN)
    assert missing.status_code == 404 and "acme-sql" in missing.json()["error"]["message"]
    # whatever `model` may name has a card, the base's version included
    base = client.get(f"/v1/models/{BASE}@1", headers=ADMIN).json()
    assert base["id"] == f"{BASE}@1" and base["root"] == f"{BASE}@1" and base["kind"] == "base"
    assert client.get(f"/v1/models/{BASE}@latest", headers=ADMIN).json()["root"] == f"{BASE}@1"
    assert client.get("/v1/models/acme-sql@9", headers=ADMIN).status_code == 404
    assert client.get("/v1/models/globex-sql@1", headers=ACME).status_code == 403


def test_a_combination_has_a_card_as_generation_serves_it(client):
    parts = ["acme-sql@prod", "acme-sql@2", "acme-chat@latest", "acme-chat@1"] * 2
    model = "+".join(f"{ref}*0.125" for ref in parts)  # longer than one reference: the path takes it too
    card = client.get(f"/v1/models/{model}", headers=ADMIN)
    assert card.status_code == 200, card.text
    assert card.json() == card.json() | {"id": model, "root": complete(client, model, max_tokens=1)["model"],
                                         "parent": BASE, "kind": "adapter", "max_model_len": 256}
    assert card.json()["created"] > 0
    assert client.get("/v1/models/acme-sql*0.5+acme-nothing", headers=ADMIN).status_code == 404
    assert client.get("/v1/models/acme-sql*half", headers=ADMIN).status_code == 400


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    """Clients often send OpenAI's defaults explicitly; those mean 'off' and are served."""
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u-1", "n": 1,
               "unknown_future_field": {"x": 1}}
    assert complete(client, BASE, best_of=1, logprobs=None, suffix="", min_tokens=2, **neutral)["choices"]
    chat = client.post("/v1/chat/completions", headers=ADMIN, json={
        "model": BASE, "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
        "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        **GREEDY, **neutral})
    assert chat.status_code == 200, chat.text


def test_a_repeated_conversation_reports_its_cached_prompt_tokens(client):
    messages = [{"role": "system", "content": "answer in sql, " * 8}, {"role": "user", "content": "count the orders"}]
    body = {"model": "acme-chat", "messages": messages, **GREEDY, "cache_salt": "test-tenant-1"}
    first, second = (client.post("/v1/chat/completions", headers=ACME, json=body).json() for _ in range(2))
    prompt = first["usage"]["prompt_tokens"]
    assert prompt > 32
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": (prompt - 1) // 16 * 16}
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    other = client.post("/v1/chat/completions", headers=ACME, json={**body, "cache_salt": "test-tenant-2"}).json()
    assert other["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    streamed = client.post("/v1/chat/completions", headers=ACME, json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    last = [line for line in streamed.text.splitlines() if line.startswith("data: {")][-1]
    assert '"prompt_tokens_details":{"cached_tokens":' in last.replace(" ", "")
    refused = client.post("/v1/chat/completions", headers=ACME, json={**body, "cache_salt": ""})
    assert refused.status_code == 400 and "cache_salt" in refused.text
