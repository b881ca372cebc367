"""What one tenant's requests may cost everyone else: the shared event loop, the shared engine step
and the shared prefix cache."""

from __future__ import annotations

import threading

import pytest

from hotswap.serve.engine import MAX_STOP_CHARS
from hotswap.serve.engine.detok import _held

from .api_support import ACME, ADMIN, BASE, GLOBEX, client, served, store  # noqa: F401


def test_stop_strings_longer_than_the_limit_are_refused(client):
    """Every generated token looks for each stop string's start in the text's tail: a long one made a
    single request slow down every engine step."""
    body = {"model": BASE, "prompt": "hi", "max_tokens": 2}
    for stop in ["x" * (MAX_STOP_CHARS + 1), ["ok", "y" * 100_000]]:
        response = client.post("/v1/completions", headers=ACME, json=body | {"stop": stop})
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["param"] == "stop"
    assert client.post("/v1/completions", headers=ACME, json=body | {"stop": "z" * MAX_STOP_CHARS}).status_code == 200


def test_text_held_back_for_a_stop_string_is_its_longest_possible_start():
    def brute(text: str, stop: str) -> int:
        return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])), 0)

    for text in ["", "a", "ab", "abab", "xaab", "aaaa", "abcab", "ba"]:
        for stop in ["a", "ab", "aab", "abab", "abc", "bab", "aaaaa", "c"]:
            assert _held(text, stop) == brute(text, stop), (text, stop)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hello " * 20_000, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 20_000}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "hello " * 20_000}),
])
def test_a_text_far_beyond_the_context_is_refused_before_it_is_tokenized(served, monkeypatch, path, body):
    client, engine = served
    tokenized = []
    real = type(engine.tokenizer).__call__
    monkeypatch.setattr(type(engine.tokenizer), "__call__", lambda self, text, **kw: tokenized.append(len(text))
                        or real(self, text, **kw))
    response = client.post(path, headers=ACME, json=body | {"model": BASE})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "characters cannot fit the context of 256" in error["message"]
    assert not any(n > 100_000 for n in tokenized)


def health_answers_while_blocked(served, monkeypatch, method: str) -> bool:
    """Whether /health answers while a completion is held inside ``engine.<method>`` (until /health has
    answered, or 20 s): with the event loop blocked there it would answer only once the hold gave up."""
    client, engine = served
    real, entered, release, timed_out = getattr(engine, method), threading.Event(), threading.Event(), []

    def held(*args):
        entered.set()
        timed_out.append(not release.wait(timeout=20))
        return real(*args)
    monkeypatch.setattr(engine, method, held)
    slow = threading.Thread(target=client.post, args=("/v1/completions",),
                            kwargs={"headers": ACME, "json": {"model": BASE, "prompt": "hi", "max_tokens": 1}})
    slow.start()
    assert entered.wait(timeout=20)
    health = client.get("/health")
    release.set()
    slow.join()
    return health.status_code == 200 and timed_out == [False]


def test_a_slow_prompt_does_not_hold_up_other_requests(served, monkeypatch):
    """Prompts are tokenized as their requests are queued; a long one takes seconds, which must not
    stop the server from answering everyone else meanwhile."""
    assert health_answers_while_blocked(served, monkeypatch, "submit"), "/health waited behind a prompt"


def test_one_key_cannot_read_another_keys_prompts_from_the_prefix_cache(client):
    """`cached_tokens` (or the time to first token) would tell a tenant which prompts another one sent to
    a model both may use: the cache is keyed by the API key as well, whatever salts they send."""
    prompt = "the quick brown fox jumps over the lazy dog; " * 6

    def cached(headers, **extra) -> int:
        body = {"model": BASE, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
        response = client.post("/v1/completions", headers=headers, json=body)
        assert response.status_code == 200, response.text[:300]
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(ACME) == 0
    assert cached(GLOBEX) == 0 and cached(ADMIN) == 0
    assert cached(ACME) > 0  # a key still reuses its own prefixes
    assert cached(ACME, cache_salt="team-1") == 0
    assert cached(GLOBEX, cache_salt="team-1") == 0  # a guessed salt does not reach another key's cache
    assert cached(ACME, cache_salt="team-1") > 0


def test_a_slow_registry_read_does_not_hold_up_other_requests(served, monkeypatch):
    """Resolving a name reads the registry, which waits while a model load re-hashes its files: that
    wait must not stop the server from answering everyone else."""
    assert health_answers_while_blocked(served, monkeypatch, "resolve"), "/health waited behind a resolve"
