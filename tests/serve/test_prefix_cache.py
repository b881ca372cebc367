"""Prefix caching: full KV blocks shared between requests with the same prefix, keyed by the version
digest (and a tenant's salt), never by name; evicted least recently released first."""

from __future__ import annotations

import pytest

from hotswap.hub import Registry
from hotswap.serve.engine import GenerationRequest, SamplingParams
from hotswap.serve.engine.kv_cache import BlockManager, extend_block_hashes

from .engine_support import (  # noqa: F401
    BASE, PROMPTS, AdapterSpec, engine, peft_greedy, preload, save_adapter, start_engine, tiny_tokenizer, world)

LONG = " ".join(PROMPTS)  # 81 tokens: five full blocks of 16 and one token more


def hashes(tokens: list[int], key: bytes = b"k", bs: int = 4) -> list[bytes]:
    found: list[bytes] = []
    extend_block_hashes(found, tokens, len(tokens), bs, key)
    return found


# --- the block bookkeeping ------------------------------------------------------------------------
def test_hashes_chain_over_blocks_and_key():
    a = hashes(list(range(12)))
    assert len(a) == 3 and len(set(a)) == 3
    assert hashes(list(range(12))) == a
    assert hashes(list(range(11)))[:2] == a[:2] and len(hashes(list(range(11)))) == 2  # partial block: no hash
    changed = hashes([99] + list(range(1, 12)))
    assert all(x != y for x, y in zip(changed, a))  # a change in block 0 changes every later hash
    assert all(x != y for x, y in zip(hashes(list(range(12)), key=b"other"), a))


def test_shared_blocks_are_referenced_then_kept_evictable():
    bm = BlockManager(num_blocks=6, block_size=4)
    first: list[int] = []
    bm.grow(first, 10)  # 3 blocks
    h = hashes(list(range(10)))  # 2 full blocks
    bm.register(first, h, 0)
    assert bm.num_cached == 2 and bm.num_free == 3
    shared = bm.match(hashes(list(range(9))))
    assert shared == first[:2]
    second: list[int] = []
    assert bm.can_grow(second, 12, shared)
    bm.share(second, shared)
    bm.grow(second, 12)
    assert second[:2] == first[:2] and second[2] not in first and bm.num_free == 2
    kept = second[:2]
    bm.free(first)  # the shared blocks stay with the second holder
    assert bm.num_free == 3 and bm.match(h) == second[:2]
    bm.free(second)  # (free empties the table)
    assert bm.num_free == 6 and bm.num_used == 0 and bm.num_cached == 2  # evictable, still matchable
    again: list[int] = []
    bm.share(again, bm.match(h))
    assert again == kept and bm.num_free == 4


def test_evicts_cached_blocks_last_and_least_recently_released_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    tables = []
    for start in (0, 100):  # two sequences of one full block each, released in this order
        table: list[int] = []
        bm.grow(table, 4)
        bm.register(table, hashes(list(range(start, start + 4))), 0)
        tables.append(list(table))
        bm.free(table)
    fresh: list[int] = []
    bm.grow(fresh, 8)  # two never-cached blocks are used before any cached one
    assert set(fresh).isdisjoint(tables[0] + tables[1]) and bm.num_cached == 2
    bm.grow(fresh, 12)  # now the older cached block goes
    assert fresh[2] == tables[0][0] and bm.num_cached == 1
    assert bm.match(hashes(list(range(4)))) == [] and bm.match(hashes(list(range(100, 104)))) == tables[1]
    assert not bm.can_grow(fresh, 20) and bm.can_grow(fresh, 16)


def test_a_block_computed_twice_is_cached_once_and_caching_can_be_off():
    bm = BlockManager(num_blocks=4, block_size=4)
    h = hashes(list(range(4)))
    a: list[int] = []
    b: list[int] = []
    bm.grow(a, 4)
    bm.grow(b, 4)
    bm.register(a, h, 0)
    bm.register(b, h, 0)  # the same tokens computed by a sequence that started beside the first
    assert bm.num_cached == 1 and bm.match(h) == a
    bm.free(b)
    assert bm.num_free == 3
    off = BlockManager(num_blocks=4, block_size=4, caching=False)
    c: list[int] = []
    off.grow(c, 4)
    off.register(c, h, 0)
    assert off.match(h) == [] and off.num_cached == 0


# --- in the engine --------------------------------------------------------------------------------
def run(engine, model: str | None, ids: list[int], salt: str | None = None, **sampling):
    sp = SamplingParams(**{"max_tokens": 8, **sampling})
    return engine.generate_sync([GenerationRequest(prompt_token_ids=ids, model=model, sampling=sp,
                                                   cache_salt=salt)])[0]


def test_a_repeated_prompt_reuses_its_blocks_and_answers_the_same(engine, world):
    ids = tiny_tokenizer()(LONG)["input_ids"]
    assert len(ids) == 81
    preload(engine, ["chat"])
    first = run(engine, "chat", ids, logprobs=2)
    second = run(engine, "chat", ids, logprobs=2)
    assert (first.usage.cached_tokens, second.usage.cached_tokens) == (0, 80)
    assert list(first.token_ids) == list(second.token_ids) == peft_greedy(
        world.base_dir, world.adapter_dirs["chat"], ids, 8)
    for a, b in zip(first.logprobs, second.logprobs):
        assert a.chosen.logprob == pytest.approx(b.chosen.logprob, abs=1e-5)
    stats = engine.stats()
    assert stats.prefix_cache_hits == 80 and stats.prefix_cache_queries == 2 * 81


def test_prompt_of_exact_blocks_still_computes_its_last_token(engine, world):
    ids = tiny_tokenizer()(LONG)["input_ids"][:64]
    run(engine, None, ids)
    again = run(engine, None, ids)
    assert again.usage.cached_tokens == 48  # the last block holds the token whose logits are needed
    assert list(again.token_ids) == peft_greedy(world.base_dir, None, ids, 8)


def test_no_reuse_across_adapters_the_base_or_salts(engine, world):
    ids = tiny_tokenizer()(LONG)["input_ids"]
    preload(engine, ["chat", "sql"])
    assert run(engine, "chat", ids).usage.cached_tokens == 0
    assert run(engine, "sql", ids).usage.cached_tokens == 0
    assert run(engine, None, ids).usage.cached_tokens == 0
    assert run(engine, "chat", ids, salt="tenant-a").usage.cached_tokens == 0
    assert run(engine, "chat", ids, salt="tenant-a").usage.cached_tokens == 80
    assert run(engine, "chat", ids, salt="tenant-b").usage.cached_tokens == 0
    out = run(engine, "sql", ids)
    assert out.usage.cached_tokens == 80
    assert list(out.token_ids) == peft_greedy(world.base_dir, world.adapter_dirs["sql"], ids, 8)


def test_a_conversation_reuses_the_previous_answer_blocks(engine, world):
    tok = tiny_tokenizer()
    ids = tok(LONG)["input_ids"][:40]
    first = run(engine, "chat", ids, max_tokens=30, ignore_eos=True)
    follow = ids + list(first.token_ids) + tok(" and then")["input_ids"]
    second = run(engine, "chat", follow)
    # 40 prompt + 29 generated tokens had their KV computed: four full blocks
    assert second.usage.cached_tokens == 64
    assert list(second.token_ids) == peft_greedy(world.base_dir, world.adapter_dirs["chat"], follow, 8)


def test_a_moved_alias_never_reuses_the_old_versions_kv(world, tmp_path):
    registry = Registry(world.home)
    dirs = [save_adapter(world.base_dir, tmp_path / f"v{i}", AdapterSpec("shifting", 8, ("k_proj", "v_proj"), seed=60 + i))
            for i in (1, 2)]
    registry.publish(dirs[0], name="shifting", kind="adapter", base=BASE, aliases=("prod",))
    registry.publish(dirs[1], name="shifting", kind="adapter", base=BASE)
    ids = tiny_tokenizer()(LONG)["input_ids"]
    engine = start_engine(world.home)
    try:
        assert run(engine, "shifting@prod", ids).usage.cached_tokens == 0
        assert run(engine, "shifting@prod", ids).usage.cached_tokens == 80
        registry.alias("shifting@2", "prod")
        moved = run(engine, "shifting@prod", ids)
        assert moved.usage.cached_tokens == 0
        assert list(moved.token_ids) == peft_greedy(world.base_dir, dirs[1], ids, 8)
    finally:
        engine.stop_sync()
        registry.close()


def test_prompt_logprobs_are_computed_not_taken_from_the_cache(engine):
    ids = tiny_tokenizer()(LONG)["input_ids"]
    run(engine, "chat", ids)
    scored = run(engine, "chat", ids, max_tokens=0, prompt_logprobs=1)
    assert scored.usage.cached_tokens == 0
    assert len(scored.prompt_logprobs) == len(ids) and all(e.chosen.logprob is not None
                                                          for e in scored.prompt_logprobs[1:])
    # once a request has scored its prompt, what it computed is offered to the next one
    assert run(engine, "chat", ids).usage.cached_tokens == 80


def test_recycled_blocks_never_serve_stale_kv(world):
    """A KV pool of 12 blocks: every request evicts cached blocks of the ones before it."""
    tok = tiny_tokenizer()
    prompts = [tok(f"{PROMPTS[i]} {LONG}")["input_ids"][:70] for i in range(4)]
    engine = start_engine(world.home, kv_cache_bytes=12 * 2 * 3 * 16 * 2 * 16 * 4)
    try:
        assert engine._base.blocks.num_blocks == 12
        outs = [run(engine, "chat", ids) for ids in prompts + prompts[:2]]
        for ids, out in zip(prompts + prompts[:2], outs):
            assert list(out.token_ids) == peft_greedy(world.base_dir, world.adapter_dirs["chat"], ids, 8)
        assert outs[4].usage.cached_tokens < 64  # its blocks were evicted (in part or whole)
    finally:
        engine.stop_sync()


def test_caching_off_computes_every_prompt(world):
    ids = tiny_tokenizer()(LONG)["input_ids"]
    engine = start_engine(world.home, prefix_caching=False)
    try:
        assert [run(engine, None, ids).usage.cached_tokens for _ in range(2)] == [0, 0]
        assert engine._base.blocks.num_cached == 0
    finally:
        engine.stop_sync()


def test_bucketed_decode_steps_read_shared_blocks(world):
    """The decode path of CUDA graphs (run eagerly on the CPU): block tables that share blocks."""
    ids = tiny_tokenizer()(LONG)["input_ids"]
    engine = start_engine(world.home, decode_graphs=True)
    try:
        preload(engine, ["chat", "mlp"])
        run(engine, "chat", ids)
        run(engine, "mlp", ids)
        sp = SamplingParams(max_tokens=8)
        outs = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, model=m, sampling=sp)
                                     for m in ("chat", "mlp", "chat")])
        assert [o.usage.cached_tokens for o in outs] == [80, 80, 80]
        for out, m in zip(outs, ("chat", "mlp", "chat")):
            assert list(out.token_ids) == peft_greedy(world.base_dir, world.adapter_dirs[m], ids, 8)
    finally:
        engine.stop_sync()


@pytest.mark.parametrize("budget", [64, 512])
def test_requests_sent_together_share_the_prefix_their_step_computes(world, budget):
    """With a 64-token budget the first prompt is computed over two steps and the others start in the
    second; with 512 all three start in the first. Either way the prefix is computed once."""
    ids = tiny_tokenizer()(LONG)["input_ids"]
    engine = start_engine(world.home, max_batch_tokens=budget)
    try:
        preload(engine, ["chat"])
        outs = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, model="chat",
                                                       sampling=SamplingParams(max_tokens=8)) for _ in range(3)])
        assert [o.usage.cached_tokens for o in outs] == [0, 80, 80]
        want = peft_greedy(world.base_dir, world.adapter_dirs["chat"], ids, 8)
        assert all(list(o.token_ids) == want for o in outs)
    finally:
        engine.stop_sync()


def test_a_failed_step_leaves_no_cached_block_behind(engine, world, monkeypatch):
    ids = tiny_tokenizer()(LONG)["input_ids"]
    run(engine, None, ids)
    runner = engine._base.runner
    real = runner.forward
    monkeypatch.setattr(runner, "forward", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(Exception, match="boom"):
        run(engine, None, ids[:40] + ids[:41])  # its blocks were offered for the step that failed
    monkeypatch.setattr(runner, "forward", real)
    assert engine._base.blocks.num_cached == 0
    again = run(engine, None, ids)
    assert again.usage.cached_tokens == 0
    assert list(again.token_ids) == peft_greedy(world.base_dir, None, ids, 8)


def _long_ids(n: int = 100) -> list[int]:
    return tiny_tokenizer()("the quick brown fox jumps over the lazy dog " * 40)["input_ids"][:n]


def test_a_prompt_preempted_mid_prefill_leaves_no_uncomputed_block_cached(world):
    """Only blocks a step fills are offered to the cache. Here a long prompt, computed 16 tokens a
    step beside a decoding request, is preempted for KV room after two chunks and starts again: it must
    not take its own later blocks back from the cache, whose KV was never written."""
    block_bytes = 2 * 3 * 16 * 2 * 16 * 4  # K and V of one 16-token block of the tiny base, float32
    ids, other = _long_ids(), tiny_tokenizer()("hello world, how are you today? once upon a")["input_ids"][:14]
    want = peft_greedy(world.base_dir, world.adapter_dirs["sql"], ids, 8)
    eng = start_engine(world.home, max_batch_tokens=16, kv_cache_bytes=8 * block_bytes)
    try:
        preload(eng, ["sql"])
        decoding, long = eng.submit_many([
            GenerationRequest(prompt_token_ids=other, sampling=SamplingParams(max_tokens=40, ignore_eos=True)),
            GenerationRequest(prompt_token_ids=ids, model="sql", sampling=SamplingParams(max_tokens=8))])
        assert list(long.result().token_ids) == want
        decoding.result()
        assert eng.stats().preemptions >= 1
    finally:
        eng.stop_sync()


def test_a_prompt_cancelled_mid_prefill_leaves_no_uncomputed_block_cached(world):
    ids = _long_ids()
    want = peft_greedy(world.base_dir, world.adapter_dirs["sql"], ids, 8)
    eng = start_engine(world.home, max_batch_tokens=16)
    try:
        preload(eng, ["sql"])
        core, worker = eng._core, eng._base
        step, cut = worker.step, []

        def cancel_after_first_chunk(*args, **kwargs):  # as a client hanging up during a long prompt
            out = step(*args, **kwargs)
            seq = core.seqs.get("long")
            if seq is not None and seq.num_computed >= 16 and not cut:
                cut.append(worker.blocks.num_cached)
                core.cancel("long")
            return out
        worker.step = cancel_after_first_chunk
        first = eng.submit(GenerationRequest(prompt_token_ids=ids, model="sql", request_id="long",
                                             sampling=SamplingParams(max_tokens=8)))
        assert first.result().finish_reason == "cancelled" and cut == [1]  # the one block computed
        worker.step = step
        again = eng.generate_sync([GenerationRequest(prompt_token_ids=ids, model="sql",
                                                     sampling=SamplingParams(max_tokens=8))])[0]
        assert list(again.token_ids) == want and again.usage.cached_tokens == 16
    finally:
        eng.stop_sync()
