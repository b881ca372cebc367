"""/metrics in Prometheus text format, with per-model figures, after real traffic on the real engine."""

from __future__ import annotations

import re

from .api_support import ADMIN, BASE, client, served, store  # noqa: F401

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(client) -> dict[tuple[str, frozenset], float]:
    """The exposition, checked as Prometheus reads it: each family's HELP then TYPE once, its samples right
    after (histograms: _bucket, _sum, _count), no series twice, histograms cumulative up to +Inf = _count."""
    response = client.get("/metrics", headers=ADMIN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, kinds, family = {}, {}, None
    for line in response.text.splitlines():
        if line.startswith("# HELP "):
            family = line.split()[2]
            assert family not in kinds, f"{family} described twice"
            kinds[family] = None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == family and kinds[name] is None and kind in ("counter", "gauge", "histogram")
            kinds[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a Prometheus sample: {line!r}"
            name = match.group(1)
            suffixes = ("_bucket", "_sum", "_count") if kinds[family] == "histogram" else ("",)
            assert name in {family + s for s in suffixes}, f"{name} outside its family {family}"
            labels = frozenset(LABEL.findall(match.group(2) or ""))
            assert (name, labels) not in samples, f"series twice: {line!r}"
            samples[(name, labels)] = float(match.group(3).replace("+Inf", "inf"))
    for name in (n for n, kind in kinds.items() if kind == "histogram"):
        series: dict[frozenset, list[tuple[float, float]]] = {}
        for (sample, labels), count in samples.items():
            if sample == name + "_bucket":
                le = dict(labels)["le"]
                series.setdefault(labels - {("le", le)}, []).append((float(le.replace("+Inf", "inf")), count))
        for labels, buckets in series.items():
            counts = [count for _, count in sorted(buckets)]
            assert max(buckets)[0] == float("inf") and counts == sorted(counts), f"{name} {labels}"
            assert counts[-1] == samples[(name + "_count", labels)] and (name + "_sum", labels) in samples
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def complete(client, model: str, max_tokens: int = 5) -> dict:
    response = client.post("/v1/completions", headers=ADMIN, json={
        "model": model, "prompt": "hello world", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def test_per_model_request_token_and_latency_figures(client):
    before = scrape(client)
    usages = [complete(client, "acme-sql@1")["usage"] for _ in range(3)] + [complete(client, BASE, 4)["usage"]]
    chat = client.post("/v1/chat/completions", headers=ADMIN, json={
        "model": "acme-sql@1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
        "ignore_eos": True})
    assert chat.status_code == 200
    assert client.post("/v1/completions", headers=ADMIN, json={"model": "nobody", "prompt": "x"}).status_code == 404
    too_long = {"model": "acme-sql@1", "prompt": "hello " * 300, "max_tokens": 2}
    assert client.post("/v1/completions", headers=ADMIN, json=too_long).status_code == 400

    s = scrape(client)
    delta = lambda name, **labels: value(s, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("hotswap_requests_total", model="acme-sql@1", endpoint="completions", finish_reason="length") == 3
    assert delta("hotswap_requests_total", model="acme-sql@1", endpoint="chat", finish_reason="length") == 1
    assert delta("hotswap_requests_total", model="tiny@1", endpoint="completions", finish_reason="length") == 1
    assert delta("hotswap_prompt_tokens_total", model="acme-sql@1") == \
        sum(u["prompt_tokens"] for u in usages[:3]) + chat.json()["usage"]["prompt_tokens"]
    assert delta("hotswap_generation_tokens_total", model="acme-sql@1") == 3 * 5 + 2
    assert delta("hotswap_generation_tokens_total", model="tiny@1") == 4
    assert delta("hotswap_request_errors_total", model="none", status="404") == 1
    assert delta("hotswap_request_errors_total", model="acme-sql@1", status="400") == 1
    # n samples of one prompt count its tokens once, as `usage` does
    before = scrape(client)
    sampled = client.post("/v1/completions", headers=ADMIN, json={
        "model": "acme-sql@1", "prompt": "hello world", "max_tokens": 2, "n": 3, "seed": 1, "ignore_eos": True})
    assert sampled.status_code == 200, sampled.text
    after = scrape(client)
    assert value(after, "hotswap_prompt_tokens_total", model="acme-sql@1") - value(
        before, "hotswap_prompt_tokens_total", model="acme-sql@1") == sampled.json()["usage"]["prompt_tokens"]

    for family in ("hotswap_time_to_first_token_seconds", "hotswap_time_per_output_token_seconds"):
        count = value(s, f"{family}_count", model="acme-sql@1")
        assert count == 4 and value(s, f"{family}_sum", model="acme-sql@1") > 0
        buckets = sorted(((float(dict(lbl)["le"]), v) for (name, lbl), v in s.items()
                          if name == f"{family}_bucket" and dict(lbl)["model"] == "acme-sql@1"))
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[-1] == (float("inf"), count)


def test_combinations_share_one_label(client):
    before = scrape(client)
    for weight in (0.5, 0.25, 0.125):  # weights are the caller's to choose: no series per combination
        complete(client, f"acme-sql*{weight}+acme-chat", 3)
    s = scrape(client)
    got = value(s, "hotswap_generation_tokens_total", model="combination")
    assert got - value(before, "hotswap_generation_tokens_total", model="combination") == 9
    assert not any("*" in dict(labels).get("model", "") for name, labels in s
                   if name.startswith(("hotswap_requests", "hotswap_generation", "hotswap_time")))


def test_residency_cache_and_queue_figures(client):
    before = scrape(client)
    complete(client, "globex-sql")  # cold: found on disk
    complete(client, "globex-sql")  # warm: already in a device slot
    s = scrape(client)
    delta = lambda name, **labels: value(s, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("hotswap_adapter_cache_misses_total", tier="device") >= 1
    assert delta("hotswap_adapter_cache_misses_total", tier="host") >= 1
    assert delta("hotswap_adapter_cache_hits_total", tier="device") >= 1
    assert value(s, "hotswap_adapter_resident", model="globex-sql@1", kind="adapter", tier="device") == 1
    assert value(s, "hotswap_adapter_load_seconds_count") >= 1
    assert value(s, "hotswap_lora_slots_in_use") >= 1
    assert value(s, "hotswap_lora_bytes", state="used") > 0
    assert value(s, "hotswap_lora_bytes", state="capacity") >= value(s, "hotswap_lora_bytes", state="used")
    assert value(s, "hotswap_queue_depth") == 0 and value(s, "hotswap_requests_running") == 0
    assert value(s, "hotswap_ready") == 1
    assert value(s, "hotswap_kv_blocks", state="total") > 0
    assert value(s, "hotswap_engine_preemptions_total") == 0  # a KV cache this size never runs short here


def test_prefix_cache_figures(client):
    before = scrape(client)
    prompt = "select name from users where id = 1; " * 6
    usages = []
    for _ in range(2):
        response = client.post("/v1/completions", headers=ADMIN, json={
            "model": "acme-sql@1", "prompt": prompt, "max_tokens": 2, "cache_salt": "metrics-test"})
        assert response.status_code == 200, response.text
        usages.append(response.json()["usage"])
    s = scrape(client)
    delta = lambda name, **labels: value(s, name, **labels) - value(before, name, **labels)  # noqa: E731
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert delta("hotswap_prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("hotswap_prefix_cache_hits_total") == cached
    assert value(s, "hotswap_kv_blocks", state="cached") >= cached // 16
