"""`hotswap bench --traffic`: the open-loop workload, and a run on a tiny random-init shape."""

from __future__ import annotations

from collections import Counter

import pytest
from typer.testing import CliRunner

from hotswap.serve.bench_traffic import TrafficSettings, _p50_p90, format_traffic, make_workload, run_traffic
from hotswap.serve.cli import bench_app


def test_workload_is_seeded_with_poisson_arrivals_and_power_law_popularity():
    s = TrafficSettings(requests=400, rate=10.0, zipf=1.0, adapters=8, prompt=20, new_tokens=10)
    workload = make_workload(s, vocab_size=100)
    assert workload == make_workload(s, vocab_size=100)  # the same requests for both configurations
    arrivals = [r.at for r in workload]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert 0.08 < arrivals[-1] / (len(arrivals) - 1) < 0.12  # mean gap 1 / rate
    counts = Counter(r.adapter for r in workload)
    assert set(counts) <= set(range(8)) and counts[0] == max(counts.values())
    assert counts[0] > 3 * counts.get(7, 0)  # weight 1 against 1/8
    assert all(10 <= len(r.prompt) <= 30 and 5 <= r.max_tokens <= 15 for r in workload)
    assert all(5 <= t < 100 for r in workload for t in r.prompt)


def test_traffic_over_more_adapters_than_slots_evicts_and_reloads():
    s = TrafficSettings(base=None, shape="tiny", device="cpu", requests=10, rate=200.0, adapters=4, slots=1,
                        rank=4, prompt=8, new_tokens=4, repeat=2)
    result = run_traffic(s)
    assert set(result.req_s) == set(result.tok_s) == {"base", "adapters"}
    assert all(v > 0 for v in (*result.req_s.values(), *result.tok_s.values()))
    assert len(result.ratio_rounds) == 2 and min(result.ratio_rounds) <= result.ratio <= max(result.ratio_rounds)
    assert all(p50 <= p90 for p50, p90 in (*result.ttft_ms.values(), *result.latency_ms.values()))
    events = result.adapter_events
    # every adapter request of the timed rounds is counted once, by where its adapter was found; with
    # one device slot and several adapters in use, slots are given up and refilled from the host cache
    assert sum(v for k, v in events.items() if k.startswith("hits_")) == 10 * 2
    assert result.adapters_used > 1 and events["evictions_device"] > 0 and events["hits_host"] > 0
    assert events.get("hits_disk", 0) == 0  # the untimed first round read each adapter once
    table = format_traffic(result)
    assert "10 requests at 200/s" in table and "| their adapters (4, 1 slot) |" in table
    assert "read from the registry" in table


def test_traffic_options_are_checked():
    runner = CliRunner()
    out = runner.invoke(bench_app, ["--shape", "tiny", "--traffic", "4", "--shared-prefix", "16"])
    assert out.exit_code != 0 and "no shared prefix" in out.output
    out = runner.invoke(bench_app, ["--shape", "tiny", "--traffic", "4", "--rate", "0"])
    assert out.exit_code != 0 and "must be > 0" in out.output


def test_percentiles_interpolate_between_the_nearest_values():
    """An even count's median is the mean of the middle two; p90 of ten values is not the maximum."""
    seconds = lambda *ms: [m / 1000 for m in ms]  # noqa: E731
    assert _p50_p90(seconds(*range(1, 11))) == pytest.approx((5.5, 9.1))
    assert _p50_p90(seconds(1, 2, 3, 4)) == pytest.approx((2.5, 3.7))
    assert _p50_p90(seconds(4, 1, 3, 2)) == pytest.approx((2.5, 3.7))  # any order
    assert _p50_p90(seconds(7)) == pytest.approx((7, 7))


def test_traffic_refuses_requests_longer_than_the_context_at_their_longest():
    """Lengths go to 1.5x the means: a mean of 2800 + 32 fits 4096, its longest, 4200 + 48, does not."""
    out = CliRunner().invoke(bench_app, ["--shape", "tiny", "--traffic", "4", "--prompt", "2800", "--new-tokens", "32"])
    said = " ".join(out.output.replace("│", " ").split())  # the error box's wrapping removed
    assert out.exit_code == 2 and "the longest request, 4200 + 48 tokens" in said
    assert "= 4248 tokens exceeds the base's context of 4096 tokens" in said
