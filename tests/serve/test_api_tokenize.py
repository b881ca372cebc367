"""/tokenize and /detokenize (vLLM's): the named model's tokenizer and chat template, its context
length, and the same access rules as generation."""

from __future__ import annotations

from .api_support import ACME, ADMIN, BASE, GLOBEX, client, served, store, tiny_tokenizer  # noqa: F401


def test_tokenize_a_prompt_and_back(client):
    tok = tiny_tokenizer()
    text = "select name from users where id = 1"
    body = client.post("/tokenize", headers=ACME, json={"model": "acme-sql@prod", "prompt": text,
                                                        "return_token_strs": True}).json()
    assert body["tokens"] == tok(text)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    assert body["max_model_len"] == 256
    back = client.post("/detokenize", headers=ACME, json={"model": "acme-sql", "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    plain = client.post("/tokenize", headers=ADMIN, json={"model": BASE, "prompt": text}).json()
    assert plain["tokens"] == body["tokens"] and plain["token_strs"] is None


def test_tokenize_a_conversation_with_the_chat_template(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    tok = tiny_tokenizer()
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = client.post("/tokenize", headers=ADMIN, json={"model": "tiny-ft", "messages": messages}).json()
    assert body["tokens"] == tok(rendered)["input_ids"]
    bare = client.post("/tokenize", headers=ADMIN, json={"model": "tiny-ft", "messages": messages,
                                                         "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"]
    # the count matches what a chat completion reports as its prompt
    chat = client.post("/v1/chat/completions", headers=ADMIN, json={
        "model": "tiny-ft", "messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]


def test_tokenize_refuses_bad_input_and_other_tenants_adapters(client):
    both = client.post("/tokenize", headers=ADMIN, json={
        "model": BASE, "prompt": "x", "messages": [{"role": "user", "content": "x"}]})
    assert both.status_code == 400 and "exactly one of prompt or messages" in both.text
    assert client.post("/tokenize", headers=ADMIN, json={"model": BASE}).status_code == 400
    assert client.post("/tokenize", headers=GLOBEX, json={"model": "acme-sql", "prompt": "x"}).status_code == 403
    assert client.post("/tokenize", headers=ADMIN, json={"model": "nobody", "prompt": "x"}).status_code == 404
    assert client.post("/tokenize", json={"model": BASE, "prompt": "x"}).status_code == 401
    out_of_range = client.post("/detokenize", headers=ADMIN, json={"model": BASE, "tokens": [1, 99999]})
    assert out_of_range.status_code == 400 and "99999" in out_of_range.text
    assert out_of_range.json()["error"]["param"] == "tokens"
    negative = client.post("/detokenize", headers=ADMIN, json={"model": BASE, "tokens": [-1]})
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "tokens"
