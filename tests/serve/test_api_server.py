"""A real uvicorn on loopback: server-sent events, the official `openai` client, disconnects cancelling."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from .api_support import (  # noqa: F401 - fixtures
    ACME_KEY, ADMIN, ADMIN_KEY, BASE, GLOBEX_KEY, make_app, small_config, store, uvicorn_server)

GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(store):
    # a long context, so that a request can outlive the client by seconds even on a fast machine
    app, engine = make_app(store.home, config=small_config(max_model_len=2048))
    with uvicorn_server(app) as url:
        yield url, engine


@pytest.fixture
def url(server) -> str:
    return server[0]


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an event stream, JSON-decoded except the final [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def post_stream(url: str, path: str, body: dict) -> list:
    with httpx.stream("POST", url + path, json=body | {"stream": True}, headers=ADMIN, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return sse_events(response)


def test_streamed_completion_chunks(url):
    body = {"model": "acme-sql", "prompt": "select name from users", **GREEDY}
    whole = httpx.post(url + "/v1/completions", json=body, headers=ADMIN, timeout=60).json()
    events = post_stream(url, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and c["model"] == "acme-sql@2"
               for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_streamed_chat_chunks(url):
    body = {"model": "acme-chat", "messages": [{"role": "user", "content": "hello"}], **GREEDY}
    whole = httpx.post(url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=60).json()
    events = post_stream(url, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]" and "usage" not in events[0]
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_streamed_choices_of_several_prompts_interleave_by_index(url):
    events = post_stream(url, "/v1/completions", {"model": BASE, "prompt": ["hello", "select"], **GREEDY})
    texts = {0: "", 1: ""}
    for chunk in events[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
    for i, prompt in enumerate(["hello", "select"]):
        whole = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": prompt, **GREEDY}, headers=ADMIN,
                           timeout=60).json()
        assert texts[i] == whole["choices"][0]["text"]


def test_a_refused_adapter_in_a_stream_is_an_http_error(url):
    response = httpx.post(url + "/v1/completions", headers=ADMIN, timeout=60,
                          json={"model": "other-fit", "prompt": "x", "stream": True})
    assert response.status_code == 400 and response.json()["error"]["code"] == "incompatible_adapter"


def test_openai_client_unmodified(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    ids = {m.id for m in client.models.list()}
    assert {BASE, "acme-sql", "acme-sql@prod", "tiny-ft"} <= ids
    assert client.models.retrieve("acme-sql@prod").root == "acme-sql@1"

    completion = client.completions.create(model="acme-sql@prod", prompt="select", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.model == "acme-sql@1" and completion.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="acme-sql@prod", prompt="select", max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == completion.choices[0].text

    chat = client.chat.completions.create(model="acme-chat", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    stream = client.chat.completions.create(model="acme-chat", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5


def test_openai_client_sees_typed_errors(url):
    admin = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        admin.completions.create(model="acme-sqll", prompt="x")
    assert err.value.code == "model_not_found" and "acme-sql" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        admin.completions.create(model=BASE, prompt="x", max_tokens=0)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong-0000000000000", max_retries=0).models.list()
    acme = openai.OpenAI(base_url=url + "/v1", api_key=ACME_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        acme.chat.completions.create(model="globex-sql", messages=[{"role": "user", "content": "x"}])
    assert all(m.id == BASE or m.id.startswith("acme-") for m in acme.models.list())
    assert GLOBEX_KEY  # globex's view is covered in test_api_auth


def cancelled(engine) -> int:
    return engine.stats().requests_finished.get("cancelled", 0)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def long_request(stream: bool) -> dict:
    return {"model": "acme-sql@1", "prompt": "hello", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def pins(url: str) -> int:
    listed = httpx.get(url + "/v1/adapters", headers=ADMIN, timeout=60).json()["data"]
    return next(a for a in listed if a["ref"] == "acme-sql@1")["residency"]["pins"]


def test_disconnect_mid_stream_cancels_the_request(server):
    url, engine = server
    before = cancelled(engine)
    with httpx.stream("POST", url + "/v1/completions", json=long_request(True), headers=ADMIN, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        assert pins(url) >= 1  # the request holds its adapter while it runs
    # leaving the block closed the connection after one chunk
    assert wait_for(lambda: cancelled(engine) == before + 1), engine.stats().requests_finished
    assert wait_for(lambda: pins(url) == 0)
    assert engine.stats().running == 0


def test_disconnect_before_a_whole_answer_cancels_the_request(server):
    url, engine = server
    before = cancelled(engine)
    body = json.dumps(long_request(False)).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_for(lambda: engine.stats().running == 1)
    # the socket is closed: the server notices, cancels, and never answers
    assert wait_for(lambda: cancelled(engine) == before + 1), engine.stats().requests_finished
    assert wait_for(lambda: engine.stats().running == 0)


def metric(url: str, sample: str) -> int:
    """The value of one sample of /metrics (`name{labels}`), 0 while it has none."""
    text = httpx.get(url + "/metrics", headers=ADMIN, timeout=60).text
    return next((int(row[len(sample) + 1:]) for row in text.splitlines() if row.startswith(sample + " ")), 0)


def error_count(url: str, model: str, status: int) -> int:
    return metric(url, f'hotswap_request_errors_total{{model="{model}",status="{status}"}}')


def test_a_client_gone_before_its_body_arrived_is_no_server_error(url):
    """A connection closed halfway through the request body is the client's doing: counted as 499, never
    as a 500 (which says the server is broken)."""
    before_499, before_500 = error_count(url, "none", 499), error_count(url, "none", 500)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: 400\r\n\r\n".encode() + b'{"model": ')
        time.sleep(0.2)  # the handler is waiting for the rest of the body when the socket closes
    assert wait_for(lambda: error_count(url, "none", 499) == before_499 + 1)
    assert error_count(url, "none", 500) == before_500


def test_a_client_gone_mid_stream_is_counted(server):
    """Leaving mid-stream is counted as a 499, as leaving before a whole answer is: not lost from the metrics."""
    url, engine = server
    tokens = 'hotswap_generation_tokens_total{model="acme-sql@1"}'
    finished = 'hotswap_requests_total{model="acme-sql@1",endpoint="completions",finish_reason="cancelled"}'
    before, tokens_before, finished_before = error_count(url, "acme-sql@1", 499), metric(url, tokens), metric(url, finished)
    with httpx.stream("POST", url + "/v1/completions", json=long_request(True), headers=ADMIN, timeout=60) as response:
        assert next(line for line in response.iter_lines() if line).startswith("data: ")
    assert wait_for(lambda: error_count(url, "acme-sql@1", 499) == before + 1)
    assert wait_for(lambda: engine.stats().running == 0)
    # the tokens the engine generated before the client left still count; the request is an error, not a finish
    assert metric(url, tokens) > tokens_before
    assert metric(url, finished) == finished_before
