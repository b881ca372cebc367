"""Every error the server answers is OpenAI's error shape with the right status, on the real engine."""

from __future__ import annotations

import time

import pytest
from litestar.testing import TestClient

from hotswap.serve.engine import GenerationRequest, QueueFull, SamplingParams

from .api_support import ADMIN, BASE, make_app, running_client, small_config, client, served, store  # noqa: F401


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def post(client, path: str, body: dict, headers=ADMIN):
    return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi"}, "model"),
    ({"model": BASE, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": BASE, "prompt": "hi", "temperature": 7}, "temperature"),
    ({"model": BASE, "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": BASE, "prompt": "hi", "n": 129}, "n"),
    ({"model": BASE, "prompt": ["hi", "ho"], "n": 65}, "n"),  # 130 choices in all
    ({"model": BASE, "prompt": {"text": "hi"}}, "prompt"),
    ({"model": BASE, "prompt": ""}, "prompt"),
    ({"model": BASE, "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": BASE, "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": BASE, "prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": BASE, "prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": BASE, "prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": BASE, "prompt": "hi", "best_of": 3}, "best_of"),
    ({"model": BASE, "prompt": "hi", "stop": [""]}, "stop"),
    ({"model": BASE, "prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ({"model": "Not A Ref!", "prompt": "hi"}, "model"),
    # checked by the engine, past the schema: each still names its field
    ({"model": BASE, "prompt": "hi", "max_tokens": 5000}, "max_tokens"),
    ({"model": BASE, "prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"model": BASE, "prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"model": BASE, "prompt": [99999]}, "prompt"),
])
def test_bad_completion_parameters_name_the_field(client, body, field):
    error = error_of(post(client, "/v1/completions", body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == field
    assert field in error["message"]


@pytest.mark.parametrize("body, said", [
    ({"prompt": []}, "prompt: Input should be a valid string or List should have at least 1 item"),
    ({"prompt": "hi", "stop": [""]}, "stop.0: String should have at least 1 character"),
])
def test_a_union_field_names_what_failed_not_its_alternatives(client, body, said):
    """pydantic reports one error per alternative of a union, under paths of type names
    ("prompt.constrained-str"): the message names the client's own path instead."""
    error = error_of(post(client, "/v1/completions", {"model": BASE} | body), 400)
    assert said in error["message"] and "constrained" not in error["message"], error["message"]


def test_an_image_part_says_what_a_content_part_must_be(client):
    body = {"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    error = error_of(post(client, "/v1/chat/completions", body), 400)
    assert error["param"] == "messages" and "messages.0.content.0.type: Input should be 'text'" in error["message"]


@pytest.mark.parametrize("body, field", [
    ({"model": BASE, "messages": []}, "messages"),
    ({"model": BASE, "messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ({"model": BASE, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_bad_chat_parameters_name_the_field(client, body, field):
    error = error_of(post(client, "/v1/chat/completions", body), 400)
    assert error["param"] == field


def test_malformed_json_and_engine_limits(client):
    response = client.post("/v1/completions", content=b"{not json", headers=ADMIN | {"content-type": "application/json"})
    assert "JSON" in error_of(response, 400)["message"]
    deep = '{"model": "%s", "prompt": "hi", "stop": %s%s}' % (BASE, "[" * 100_000, "]" * 100_000)
    response = client.post("/v1/completions", content=deep, headers=ADMIN | {"content-type": "application/json"})
    assert error_of(response, 400)["message"] == "the request body is nested too deeply to read"  # not a 500
    error = error_of(post(client, "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 5000}), 400)
    assert "max_tokens" in error["message"] and "4096" in error["message"]


def test_unknown_model_is_404_with_nearest_names(client):
    error = error_of(post(client, "/v1/completions", {"model": "acme-sqll", "prompt": "hi"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "acme-sql" in error["message"]
    error = error_of(post(client, "/v1/completions", {"model": "acme-sql@9", "prompt": "hi"}), 404)
    assert "version 9" in error["message"] and "1, 2" in error["message"]
    error = error_of(post(client, "/v1/completions", {"model": "acme-sql@staging", "prompt": "hi"}), 404)
    assert "staging" in error["message"] and "prod" in error["message"]
    huge = "acme-sql@" + "9" * 30  # beyond any version the registry hands out: a bad reference, not a 500
    assert error_of(post(client, "/v1/completions", {"model": huge, "prompt": "hi"}), 400)["param"] == "model"
    for bad in ("acme-sql@0", "Bad_Name", "acme-sql@", "acme-sql*x+acme-chat"):  # malformed: invalid_name
        error = error_of(post(client, "/v1/completions", {"model": bad, "prompt": "hi"}), 400)
        assert (error["code"], error["param"]) == ("invalid_name", "model"), bad
    assert "versions run from 1" in error_of(client.get(f"/v1/adapters/{huge}", headers=ADMIN), 400)["message"]
    error = error_of(post(client, "/v1/adapters/acme-chta/load", {}), 404)
    assert error["param"] == "ref" and "acme-chat" in error["message"]


def test_adapter_for_another_base_is_refused(client):
    error = error_of(post(client, "/v1/completions", {"model": "other-fit", "prompt": "hi"}), 400)
    assert error["code"] == "incompatible_adapter" and "other" in error["message"]
    for path, body in [("/v1/classify", {"model": "other-fit", "input": "hi"}),  # `model` wherever it was sent
                       ("/classify", {"model": "other-fit", "input": "hi"}),
                       ("/tokenize", {"model": "other-fit", "prompt": "hi"})]:
        assert error_of(post(client, path, body), 400)["param"] == "model", path


def test_prompt_too_long(client):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 40
    error = error_of(post(client, "/v1/completions", {"model": BASE, "prompt": long_prompt, "max_tokens": 4}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "256" in error["message"]
    chat = {"model": BASE, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 4}
    assert error_of(post(client, "/v1/chat/completions", chat), 400)["param"] == "messages"
    chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "min_tokens": 200}
    assert error_of(post(client, "/v1/chat/completions", chat), 400)["param"] == "min_tokens"


def test_unknown_route_and_wrong_method(client):
    assert error_of(client.get("/v1/nothing-here", headers=ADMIN), 404)["message"]
    assert error_of(client.get("/v1/completions", headers=ADMIN), 405)["message"]


def test_queue_full_is_429_with_retry_after(store):
    # one running and two waiting requests of 2000 tokens each keep the queue full for seconds
    config = small_config(max_running=1, max_queue=2, max_model_len=2048)
    app, engine = make_app(store.home, config=config, retry_after_s=3)
    with running_client(app) as client:
        long = GenerationRequest(prompt="hello", sampling=SamplingParams(max_tokens=2000, ignore_eos=True))
        streams = [engine.submit(long)]
        deadline = time.monotonic() + 30
        while engine.stats().running < 1:  # the first one runs: the two behind it then wait for seconds
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(QueueFull):
            for _ in range(10):
                streams.append(engine.submit(long))
        try:
            response = post(client, "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2})
            error = error_of(response, 429)
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert response.headers["retry-after"] == "3"
        finally:
            for stream in streams:
                stream.cancel()


def test_not_ready_is_503_while_the_engine_has_not_started(store):
    app, _engine = make_app(store.home)
    client = TestClient(app)  # no lifespan: the engine never starts
    assert client.get("/health").json() == {"status": "ok", "detail": None}  # alive while it loads
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False and "loading" in ready.json()["detail"]
    assert ready.headers["retry-after"] == "1"
    response = post(client, "/v1/completions", {"model": BASE, "prompt": "hi"})
    assert error_of(response, 503)["type"] == "service_unavailable_error" and response.headers["retry-after"] == "1"
    assert error_of(client.get("/v1/models", headers=ADMIN), 503)["code"] == "not_ready"


def test_a_failed_start_is_reported_by_ready(store, tmp_path):
    from hotswap.hub import Registry
    from hotswap.serve.api import ServerSettings, create_app
    from hotswap.serve.engine import Engine

    registry = Registry(store.home)
    app = create_app(Engine(registry, "no-such-base", small_config()), registry, ServerSettings())
    with TestClient(app) as client:
        for _ in range(200):
            body = client.get("/ready").json()
            if "failed" in (body.get("detail") or ""):
                break
            time.sleep(0.05)
        assert body["ready"] is False and "no-such-base" in body["detail"]
        health = client.get("/health")  # a liveness probe: restart it
        assert health.status_code == 503 and health.json()["status"] == "failed" and "no-such-base" in health.json()["detail"]
        # requests are told why, not to retry as if the base were still loading
        for response in (post(client, "/v1/completions", {"model": "no-such-base", "prompt": "hi"}),
                         client.get("/v1/models", headers=ADMIN)):
            message = error_of(response, 503)["message"]
            assert "failed to start" in message and "no-such-base" in message and "loading" not in message


def test_a_dead_engine_loop_turns_ready_to_503_with_the_reason(store):
    app, engine = make_app(store.home)
    with running_client(app) as client:
        def broken() -> None:
            raise RuntimeError("gauges broke")
        engine._core._gauges = broken  # outside the guarded step: kills the engine loop
        for _ in range(200):
            if not engine.ready:
                break
            time.sleep(0.05)
        ready = client.get("/ready")
        assert ready.status_code == 503 and "engine loop died: RuntimeError: gauges broke" in ready.json()["detail"]
        response = post(client, "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2})
        assert error_of(response, 503)["code"] == "not_ready" and "gauges broke" in response.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "gauges broke" in health.json()["detail"]
