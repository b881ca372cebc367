"""Three tiers: more adapters than device rows, eviction and reload, background cold loads, aliases."""

from __future__ import annotations

import threading
import time

import pytest

from hotswap.hub import Registry
from hotswap.serve.engine import EngineError, GenerationRequest, PinnedOut, SamplingParams

from .engine_support import (ADAPTERS, BASE, PROMPTS, AdapterSpec, peft_greedy, preload, save_adapter,  # noqa: F401
                             start_engine, tiny_tokenizer, world)

NEW = 8
ROW_BYTES = 3 * 928 * 4  # one rank row in all 7 module pools of the tiny base (3 layers, fp32)
EDGE_BYTES = 64 * 2 * (320 + 64) * 4  # the embed_tokens and lm_head pools' 64 rows (vocab 320, hidden 64)


def req(engine, model, prompt, new=NEW):
    return GenerationRequest(prompt_token_ids=engine.tokenizer(PROMPTS[prompt])["input_ids"], model=model,
                             sampling=SamplingParams(max_tokens=new))


def expected(world, model, prompt, new=NEW):
    ids = tiny_tokenizer()(PROMPTS[prompt])["input_ids"]
    return peft_greedy(world.base_dir, world.adapter_dirs[model] if model else None, ids, new)


@pytest.mark.parametrize("overrides", [{}, {"decode_graphs": True, "native_kernels": False}],
                         ids=["default", "bucketed-decode"])
def test_more_adapters_than_rows_evict_and_reload_never_mix(world, overrides):
    # 20 rows per module: "chat" (rank 16 everywhere) cannot share q/v with "sql" (rank 8) or "attn" (12).
    # Bucketed decode steps (the GPU's graphs) keep row ids across steps: slots rewritten by another
    # adapter must be read anew
    engine = start_engine(world.home, lora_capacity_bytes=20 * ROW_BYTES, **overrides)
    try:
        names = [a.name for a in ADAPTERS]
        want = {(n, i): expected(world, n, i) for i, n in enumerate(names)}
        for round_ in range(2):  # all at once: they queue for rows, each runs with its own adapter
            streams = [(n, i, engine.submit(req(engine, n, i))) for i, n in enumerate(names)]
            for n, i, s in streams:
                assert list(s.result().token_ids) == want[(n, i)], f"round {round_}: {n} got another adapter's output"
        stats = engine.stats()
        assert stats.adapter_evictions.get("device", 0) >= 2
        assert stats.adapter_hits["disk"] == len(names)  # reloads come from the host cache, not the registry
        assert stats.lora_bytes_used <= stats.lora_bytes_capacity == 20 * ROW_BYTES + EDGE_BYTES
        assert all(r.pins == 0 for r in engine.residency())
    finally:
        engine.stop_sync()


def test_capacity_counts_bytes_not_adapters(world):
    # 18 rows per module: "attn" (rank 12 on attention), "mlp" (rank 4 on the MLP) and "odd"
    # (rank 6 on k, 2 on down) share them; "chat" (16 on every module) needs nearly all
    engine = start_engine(world.home, lora_capacity_bytes=18 * ROW_BYTES)
    try:
        preload(engine, ["attn", "mlp", "odd"])
        on_device = {r.ref for r in engine.residency() if r.tier == "device"}
        assert on_device == {"attn@1", "mlp@1", "odd@1"}
        used = sum(r.size_bytes for r in engine.residency() if r.tier == "device")
        assert engine.stats().lora_bytes_used == used < engine.stats().lora_bytes_capacity
        preload(engine, ["chat"])  # needs 16 of 18 rows in every module: the other three are evicted
        assert {r.ref for r in engine.residency() if r.tier == "device"} == {"chat@1"}
    finally:
        engine.stop_sync()


def test_host_cache_evicts_lru_by_bytes(world):
    engine = start_engine(world.home, lora_capacity_bytes=16 * ROW_BYTES, host_cache_bytes=200_000)
    try:
        for name in ("chat", "attn", "sql"):
            preload(engine, [name])
        assert engine.stats().host_cache_bytes_used <= 200_000
        assert engine.stats().adapter_evictions.get("host", 0) >= 1
        out = engine.generate_sync([req(engine, "chat", 0)])[0]  # evicted everywhere: read again from disk
        assert list(out.token_ids) == expected(world, "chat", 0)
    finally:
        engine.stop_sync()


def test_pinned_adapter_is_never_evicted(world):
    import asyncio

    engine = start_engine(world.home, lora_capacity_bytes=20 * ROW_BYTES)
    try:
        asyncio.run(engine.pin("sql"))
        preload(engine, ["mlp"])
        # "chat" needs the rows "sql" holds in q/v: refused at once, naming the pin, where waiting would
        # last until an operator unpins (a load and a request alike)
        with pytest.raises(PinnedOut, match=r"chat@1 needs rows of .*q_proj.*\(sql@1\): unpin one"):
            engine.load_future("chat").result(timeout=10)
        with pytest.raises(PinnedOut, match="sql@1"):
            engine.generate_sync([req(engine, "chat", 0)])
        assert engine.generate_sync([req(engine, "mlp", 0)])[0].token_ids  # what fits beside the pin runs
        assert {r.ref: r.manually_pinned for r in engine.residency() if r.tier == "device"}["sql@1"]
        engine.unpin("sql")
        engine.load_future("chat").result(timeout=10)
        assert "sql@1" not in {r.ref for r in engine.residency() if r.tier == "device"}
    finally:
        engine.stop_sync()


def test_pin_holds_the_adapter_even_when_another_load_wants_its_rows(world):
    """Pinning loads and pins in one step-thread turn: a load of another adapter coming right after
    the first one's load (here: forced in between) cannot evict it before the pin takes hold, which
    had left the pin on an adapter held nowhere and ``pin`` failing with a bare StopIteration."""
    import asyncio

    engine = start_engine(world.home, lora_capacity_bytes=20 * ROW_BYTES, host_cache_bytes=1)
    real = engine.load_future

    def load_then_another(ref, *args, **kwargs):
        found = real(ref, *args, **kwargs)
        found.result(timeout=30)
        try:  # "chat" needs the q/v rows "sql" holds; the host keeps only the newest copy
            real("chat").result(timeout=1)
        except PinnedOut:  # "sql" holds them, pinned
            pass
        return found
    engine.load_future = load_then_another
    engine.load = lambda ref: asyncio.wrap_future(load_then_another(ref))
    try:
        assert asyncio.run(engine.pin("sql")).tier == "device"
        held = {r.ref: (r.tier, r.manually_pinned) for r in engine.residency()}
        assert held["sql@1"] == ("device", True) and held.get("chat@1", ("host",))[0] != "device"
    finally:
        engine.stop_sync()


def test_unload_refuses_while_a_request_waits_and_pin_reloads_what_was_unloaded(world):
    """A request waiting to start counts as a use: unloading its adapter is refused (and then it is
    served from the adapter); an adapter unloaded after it loaded is loaded again by a pin."""
    import asyncio

    engine = start_engine(world.home, max_running=1)
    try:
        preload(engine, ["sql"])
        running = engine.submit(req(engine, None, 0, new=40))
        next(iter(running))  # the base request holds the only running place ...
        waiting = engine.submit(req(engine, "sql", 1))  # ... so this one waits, holding no pin yet
        assert asyncio.run(engine.unload("sql")) is False
        assert list(waiting.result().token_ids) == expected(world, "sql", 1)
        running.result()
        assert asyncio.run(engine.unload("sql")) is True  # nothing uses it now
        assert "sql@1" not in {r.ref for r in engine.residency()}
        assert asyncio.run(engine.pin("sql")).tier == "device"
        assert {r.ref: r.manually_pinned for r in engine.residency()}["sql@1"]
    finally:
        engine.stop_sync()


def test_unload_during_a_load_keeps_the_engine_serving(world, monkeypatch):
    """An adapter unloaded while its files are still being read: the finished load is dropped, and the
    engine goes on serving (that adapter too, loaded again)."""
    import asyncio

    from hotswap.serve.engine import loaders

    load = loaders.load_adapter

    def slow_load(*args, **kwargs):  # a slow disk
        time.sleep(0.5)
        return load(*args, **kwargs)
    monkeypatch.setattr(loaders, "load_adapter", slow_load)
    engine = start_engine(world.home)
    try:
        engine.load_future("sql")
        time.sleep(0.1)
        assert asyncio.run(engine.unload("sql")) is True
        time.sleep(0.6)  # the load ends after the unload (the pending load command then loads it again)
        assert engine.ready and engine.stats().host_cache_bytes_used >= 0
        out = engine.generate_sync([req(engine, "sql", 1)])[0]
        assert list(out.token_ids) == expected(world, "sql", 1) and engine.ready
    finally:
        engine.stop_sync()


def test_a_failed_load_is_tried_again_by_the_next_request(world, monkeypatch):
    """A load that failed (the disk briefly unreadable, say) fails the requests waiting for it; the
    next request for the adapter tries again instead of being refused for good."""
    from hotswap.serve.engine import loaders

    load, calls = loaders.load_adapter, []

    def flaky_load(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the registry's disk is briefly unreadable")
        return load(*args, **kwargs)
    monkeypatch.setattr(loaders, "load_adapter", flaky_load)
    engine = start_engine(world.home)
    try:
        with pytest.raises(EngineError, match="OSError: the registry.s disk is briefly unreadable"):
            engine.generate_sync([req(engine, "sql", 1)])
        out = engine.generate_sync([req(engine, "sql", 1)])[0]
        assert list(out.token_ids) == expected(world, "sql", 1) and len(calls) == 2
    finally:
        engine.stop_sync()


def test_cold_load_runs_in_background_without_stalling_running_requests(world):
    engine = start_engine(world.home)
    try:
        load, release, timed_out = engine._core.residency._load, threading.Event(), []

        def slow_load(ref, digest):  # held until the running request has finished
            timed_out.append(not release.wait(timeout=30))
            return load(ref, digest)

        engine._core.residency._load = slow_load
        running = engine.submit(req(engine, None, 0, new=40))
        next(iter(running))
        cold = engine.submit(req(engine, "chat", 1))
        running.result()
        assert {r.ref: r.tier for r in engine.residency()}["chat@1"] == "loading"
        release.set()
        assert list(cold.result().token_ids) == expected(world, "chat", 1)
        assert timed_out == [False], "the running request waited for the cold load"
        assert engine.stats().adapter_load.count == 1
    finally:
        engine.stop_sync()


def test_alias_moved_during_traffic(world, tmp_path):
    registry = Registry(world.home)
    dirs = [save_adapter(world.base_dir, tmp_path / f"v{i}", AdapterSpec("moving", 8, ("q_proj", "v_proj"), seed=40 + i))
            for i in (1, 2)]
    v1 = registry.publish(dirs[0], name="moving", kind="adapter", base=BASE, aliases=("prod",)).version
    v2 = registry.publish(dirs[1], name="moving", kind="adapter", base=BASE).version
    ids = tiny_tokenizer()(PROMPTS[2])["input_ids"]
    want1, want2 = (peft_greedy(world.base_dir, d, ids, 30) for d in dirs)
    assert want1 != want2
    engine = start_engine(world.home)
    try:
        sp = SamplingParams(max_tokens=30)
        old = engine.submit(GenerationRequest(prompt_token_ids=ids, model="moving@prod", sampling=sp))
        head = next(iter(old)).token_ids  # running on v1 ...
        Registry(world.home).alias("moving@2", "prod")  # ... when another process moves the alias
        new = engine.submit(GenerationRequest(prompt_token_ids=ids, model="moving@prod", sampling=sp))
        assert (old.target.digest, new.target.digest) == (v1.digest, v2.digest)
        assert list(head + old.result().token_ids) == want1
        assert list(new.result().token_ids) == want2
        resident = {r.digest: r.ref for r in engine.residency()}
        assert resident[v1.digest] == "moving@1" and resident[v2.digest] == "moving@2"
    finally:
        engine.stop_sync()
        registry.close()


def test_a_request_waiting_for_rows_is_not_starved_by_later_requests(world):
    """16 rows: "chat" (rank 16 everywhere) leaves none to "mlp". A request for "mlp" waits for the
    running "chat" request's rows; a "chat" request sent after it must not start meanwhile, or a steady
    stream of them would keep "chat" pinned, and "mlp" waiting, forever."""
    engine = start_engine(world.home, lora_capacity_bytes=16 * ROW_BYTES)
    try:
        preload(engine, ["mlp", "chat"])  # "mlp" now waits on the host, for rows only
        core, ended = engine._core, []
        finish = core.finish

        def record(seq, *args, **kwargs):
            ended.append(seq.request_id)
            finish(seq, *args, **kwargs)
        core.finish = record
        first = engine.submit(GenerationRequest(prompt_token_ids=engine.tokenizer(PROMPTS[0])["input_ids"],
                                                model="chat", request_id="first",
                                                sampling=SamplingParams(max_tokens=100, ignore_eos=True)))
        next(iter(first))  # it runs on for many steps
        waiting, later = req(engine, "mlp", 1), req(engine, "chat", 2, new=30)
        waiting.request_id, later.request_id = "waiting", "later"
        streams = engine.submit_many([waiting, later])
        assert list(streams[0].result().token_ids) == expected(world, "mlp", 1)
        assert list(streams[1].result().token_ids) == expected(world, "chat", 2, new=30)
        assert ended == ["first", "waiting", "later"]
    finally:
        engine.stop_sync()
