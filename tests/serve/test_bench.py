"""`hotswap bench` end to end on a tiny random-init shape: every figure present, parity with PEFT."""

from __future__ import annotations

import json

from hotswap.serve.bench import BenchSettings, format_table, run, to_json


def test_bench_measures_every_configuration_and_agrees_with_peft():
    result = run(BenchSettings(base=None, shape="tiny", batch=3, prompt=8, new_tokens=4, adapters=2, rank=4,
                               repeat=2, device="cpu"))
    assert set(result.tok_s) == {"engine_base", "engine_mixed", "hf_base", "peft_mixed"}
    assert all(v > 0 for v in result.tok_s.values())
    assert set(result.ratios) == {"mixed_vs_engine_base", "mixed_vs_peft_mixed", "engine_base_vs_hf_base",
                                  "peft_load_vs_engine_load"}
    rounds = result.ratio_rounds["mixed_vs_engine_base"]  # the median is over each round's own ratio
    assert len(rounds) == 2 and min(rounds) <= result.ratios["mixed_vs_engine_base"] <= max(rounds)
    assert result.load_ms["engine_registry_to_slot"] > 0 and result.load_ms["peft_load_adapter"] > 0
    # random adapters that really change the output, mixed in one batch: greedy rows equal PEFT's
    assert result.parity["engine_mixed_vs_peft_mixed_greedy"] == "3/3 rows identical"
    table = format_table(result)
    assert "| engine, 2 adapters mixed |" in table and "| mixed_vs_peft_mixed |" in table
    assert f"| {min(rounds):.2f} to {max(rounds):.2f} |" in table
    assert json.loads(to_json(result))["settings"]["shape"] == "tiny"
