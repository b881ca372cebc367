"""Log-probabilities over HTTP in OpenAI's two layouts, streamed and whole, read by the official client."""

from __future__ import annotations

import httpx
import openai
import pytest

from .api_support import ADMIN, ADMIN_KEY, BASE, make_app, store, uvicorn_server  # noqa: F401 - fixtures
from .test_api_server import post_stream

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def url(store):
    app, _ = make_app(store.home)
    with uvicorn_server(app) as address:
        yield address


def test_chat_logprobs_through_the_openai_client(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    chat = client.chat.completions.create(model="acme-chat", messages=CHAT, logprobs=True, top_logprobs=3,
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 8
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob)  # greedy
        assert bytes(entry.bytes).decode(errors="replace") == entry.token  # raw bytes, even of part of a character
    plain = client.chat.completions.create(model="acme-chat", messages=CHAT, logprobs=True, max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[]] * 8  # top_logprobs unset: 0
    assert [(e.token, e.logprob) for e in plain.choices[0].logprobs.content] == [(e.token, e.logprob) for e in content]


def test_streamed_chat_logprobs_equal_the_whole_response(url):
    body = {"model": "acme-chat", "messages": CHAT, "logprobs": True, "top_logprobs": 2, **GREEDY}
    whole = httpx.post(url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=60).json()
    chunks = post_stream(url, "/v1/chat/completions", body)[:-1]
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"] and len(streamed) == 8
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_completion_logprobs_layout_streamed_and_whole(url):
    body = {"model": "acme-sql", "prompt": "select name from users", "logprobs": 2, **GREEDY}
    whole = httpx.post(url + "/v1/completions", json=body, headers=ADMIN, timeout=60).json()
    lp = whole["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == value and max(top.values()) == value and 1 <= len(top) <= 2  # greedy: the best one
    chunks = post_stream(url, "/v1/completions", body)[:-1]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert {key: [v for p in parts for v in p[key]] for key in lp} == lp


def test_penalties_are_served_and_logprobs_without_a_text_prompt(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    penalised = client.completions.create(model=BASE, prompt=[5, 6, 7], max_tokens=8, temperature=0, logprobs=0,
                                          presence_penalty=-2.0, frequency_penalty=-0.5,
                                          extra_body={"ignore_eos": True})
    assert len(penalised.choices[0].logprobs.tokens) == 8
    assert all(len(top) == 1 for top in penalised.choices[0].logprobs.top_logprobs)  # the chosen token only


def test_echo_with_logprobs_scores_the_prompt(url):
    """What evaluation harnesses send to score a text (loglikelihood): echo, logprobs, one new token."""
    prompt = "select name from users where id = 1"
    body = {"model": "acme-sql", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    whole = httpx.post(url + "/v1/completions", json=body, headers=ADMIN, timeout=60).json()
    choice, usage = whole["choices"][0], whole["usage"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == usage["prompt_tokens"] + 1 and choice["text"].startswith(prompt)
    assert "".join(lp["tokens"][:usage["prompt_tokens"]]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:])
    assert all(top[t] == v for t, v, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
    assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]
    assert lp["text_offset"][-1] == len(prompt)  # the generated token starts after the echoed prompt
    # the prompt's scores do not depend on what is generated after it
    longer = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 4}, headers=ADMIN, timeout=60).json()
    assert longer["choices"][0]["logprobs"]["token_logprobs"][:-3] == lp["token_logprobs"]
    chunks = post_stream(url, "/v1/completions", body)[:-1]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert {key: [v for p in parts for v in p[key]] for key in lp} == lp


def test_echo_scores_token_id_prompts(url):
    """lm-evaluation-harness's loglikelihood request (`local-completions`, pre-tokenized by default): token-id
    prompts with echo, logprobs 1 and one new token; the scores are those of the same prompt sent as text."""
    texts = ["select name from users where id = 1", "hello world"]
    ids = [httpx.post(url + "/tokenize", json={"model": "acme-sql", "prompt": t}, headers=ADMIN).json()["tokens"]
           for t in texts]
    body = {"model": "acme-sql", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234}
    scored = httpx.post(url + "/v1/completions", json=body | {"prompt": ids}, headers=ADMIN, timeout=60)
    assert scored.status_code == 200, scored.text
    for choice, text, prompt in zip(scored.json()["choices"], texts, ids):
        by_text = httpx.post(url + "/v1/completions", json=body | {"prompt": text}, headers=ADMIN, timeout=60).json()
        assert choice["text"].startswith(text) and choice["text"] == by_text["choices"][0]["text"]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        alone = by_text["choices"][0]["logprobs"]  # scored in another batch: equal up to float rounding
        assert (lp["tokens"], lp["text_offset"]) == (alone["tokens"], alone["text_offset"])
        assert lp["token_logprobs"][1:] == pytest.approx(alone["token_logprobs"][1:], abs=1e-4)
    streamed = post_stream(url, "/v1/completions", body | {"prompt": ids[1]})
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == scored.json()["choices"][1]["text"]
    bad = httpx.post(url + "/v1/completions", json=body | {"prompt": [99999]}, headers=ADMIN, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_max_tokens_zero_with_echo_returns_the_scored_prompt_only(url):
    prompt = "select name from users where id = 1"
    body = {"model": "acme-sql", "prompt": prompt, "echo": True, "logprobs": 1, "temperature": 0}
    one = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 1}, headers=ADMIN, timeout=60).json()
    zero = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 0}, headers=ADMIN, timeout=60).json()
    choice = zero["choices"][0]
    assert (choice["text"], choice["finish_reason"], zero["usage"]["completion_tokens"]) == (prompt, "length", 0)
    assert {k: v[:-1] for k, v in one["choices"][0]["logprobs"].items()} == choice["logprobs"]
    chunks = post_stream(url, "/v1/completions", body | {"max_tokens": 0})[:-1]
    assert [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]] == [choice["logprobs"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == prompt
    refused = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 0, "echo": False}, headers=ADMIN)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_logit_bias_over_http(url):
    body = {"model": "acme-sql", "prompt": "select", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    forced = httpx.post(url + "/v1/completions", headers=ADMIN, timeout=60,
                        json=body | {"logit_bias": {"40": 100}, "logprobs": 0}).json()
    assert len(set(forced["choices"][0]["logprobs"]["tokens"])) == 1 and forced["usage"]["completion_tokens"] == 4
    refused = httpx.post(url + "/v1/completions", headers=ADMIN, timeout=60, json=body | {"logit_bias": {"999999": 5}})
    assert refused.status_code == 400 and "999999" in refused.json()["error"]["message"]
