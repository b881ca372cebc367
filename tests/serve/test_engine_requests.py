"""Requests end to end: streaming, sampling settings, chat, cancellation, shutdown and every typed error."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from hotswap.hub import Registry
from hotswap.serve.engine import (AdapterNotFound, Engine, EngineNotReady, GenerationRequest, IncompatibleAdapter,
                                  InvalidRequest, PromptTooLong, QueueFull, SamplingParams)

from .engine_support import (BASE, PROMPTS, AdapterSpec, edit_config, engine, peft_greedy, save_adapter,  # noqa: F401
                             save_model, small_config, start_engine, tiny_tokenizer, wait_until, world)


def ids_of(engine, i=0):
    return engine.tokenizer(PROMPTS[i])["input_ids"]


def test_stream_async_deltas_add_up_to_the_text(engine):
    async def main():
        stream = engine.submit(GenerationRequest(prompt=PROMPTS[1], model="chat", sampling=SamplingParams(max_tokens=12)))
        events = [e async for e in stream]
        return stream, events
    stream, events = asyncio.run(main())
    assert len(events) == 12 and all(len(e.token_ids) == 1 for e in events)
    assert [e.finish_reason for e in events] == [None] * 11 + ["length"]
    assert events[-1].usage.completion_tokens == 12 and events[-1].usage.prompt_tokens == stream.prompt_tokens
    ids = [t for e in events for t in e.token_ids]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine):
    greedy = [GenerationRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=10)) for _ in range(2)]
    a, b = engine.generate_sync(greedy)
    assert a.token_ids == b.token_ids
    sp = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    runs = [engine.generate_sync([GenerationRequest(prompt=PROMPTS[0], model="sql", sampling=sp),
                                  GenerationRequest(prompt=PROMPTS[3], sampling=SamplingParams(max_tokens=5))])[0]
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids  # the same seed repeats whatever shares the batch
    other = engine.generate_sync([GenerationRequest(prompt=PROMPTS[0], model="sql", sampling=SamplingParams(
        max_tokens=16, temperature=1.5, top_p=0.9, top_k=50, seed=8))])[0]
    assert other.token_ids != runs[0].token_ids


def test_top_k_one_is_greedy_and_repetition_penalty_matches_hf(engine, world):
    import torch
    from transformers import LlamaForCausalLM

    ids = ids_of(engine, 2)
    greedy = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=8))])[0]
    top1 = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(
        max_tokens=8, temperature=0.7, top_k=1, seed=3))])[0]
    assert top1.token_ids == greedy.token_ids
    out = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(
        max_tokens=12, repetition_penalty=1.8))])[0]
    model = LlamaForCausalLM.from_pretrained(world.base_dir).eval()
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8)
    assert list(out.token_ids) == ref[0, len(ids):].tolist()[:len(out.token_ids)]


def test_extreme_sampling_settings_fail_no_request_in_the_step(engine):
    """A temperature of 1e-40 (greedy, as vLLM takes temperatures below 1e-5) and a repetition
    penalty of 1e-40 (logits past float32's range) are served, and so is the request beside them."""
    ids = ids_of(engine, 1)
    greedy = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=8))])[0]
    tiny_t, tiny_penalty, beside = engine.generate_sync([
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=8, temperature=1e-40)),
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(
            max_tokens=8, temperature=1.0, repetition_penalty=1e-40, seed=1)),
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=8))])
    assert tiny_t.token_ids == greedy.token_ids and beside.token_ids == greedy.token_ids
    assert len(tiny_penalty.token_ids) == 8 and tiny_penalty.finish_reason == "length"


def test_stop_strings_cut_the_text(engine):
    free = engine.generate_sync([GenerationRequest(prompt=PROMPTS[4], sampling=SamplingParams(max_tokens=20))])[0]
    assert len(free.text) > 4
    stop = free.text[3:5]
    cut = engine.generate_sync([GenerationRequest(prompt=PROMPTS[4], sampling=SamplingParams(max_tokens=20, stop=(stop,)))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]
    assert stop not in cut.text
    # of several stop strings, the one that begins first ends the text, whatever their order
    late, early = free.text[4], free.text[3]
    for order in ((late, early), (early, late)):
        out = engine.generate_sync([GenerationRequest(prompt=PROMPTS[4], sampling=SamplingParams(
            max_tokens=20, stop=order))])[0]
        assert out.text == free.text[:min(free.text.find(late), free.text.find(early))]


def test_the_earliest_stop_string_in_one_tokens_text_wins():
    """Two stop strings arriving in the same token: the text ends where the first of them begins,
    whatever their order in ``stop``."""
    from hotswap.serve.engine.detok import Detokenizer

    tok = tiny_tokenizer()
    def text_of(t: int) -> str:
        return tok.decode([t], skip_special_tokens=True)
    token = next(t for t in range(len(tok)) if len(set(text_of(t))) >= 2 and text_of(t).isprintable())
    text = text_of(token)
    later = next(c for c in text if c != text[0])
    for stop in ((later, text[0]), (text[0], later)):
        detok = Detokenizer(tok, stop)
        delta, hit = detok.add(token)
        assert hit and delta + detok.flush()[0] == "" and detok.text == "", stop


def test_text_held_back_for_a_stop_string_is_sent_when_eos_ends_the_request(engine):
    """A tail that could begin a stop string waits for the next token; if that token is the end of
    the sequence, the tail is still part of the answer."""
    request = GenerationRequest(prompt="tiny model", model="sql", sampling=SamplingParams(max_tokens=40))
    free = engine.generate_sync([request])[0]
    assert free.finish_reason == "stop" and free.text  # this adapter ends its answer with EOS here
    held = GenerationRequest(prompt="tiny model", model="sql", sampling=SamplingParams(
        max_tokens=40, stop=(free.text[-1] + "\x00never",)))
    out = engine.generate_sync([held])[0]
    assert out.text == free.text and out.token_ids == free.token_ids


def test_chat_uses_the_base_chat_template(engine, world):
    messages = [{"role": "user", "content": "hello world"}]
    out = engine.generate_sync([GenerationRequest(messages=messages, model="chat", sampling=SamplingParams(max_tokens=6))])[0]
    tok = tiny_tokenizer()
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert out.usage.prompt_tokens == len(ids)
    assert list(out.token_ids) == peft_greedy(world.base_dir, world.adapter_dirs["chat"], ids, 6)[:len(out.token_ids)]


def test_cancel_frees_kv_and_unpins_at_once(engine):
    blocks_free = engine._base.blocks.num_free
    stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], model="chat", sampling=SamplingParams(max_tokens=200)))
    it = iter(stream)
    next(it)
    assert {r.ref: r.pins for r in engine.residency()}["chat@1"] == 1
    stream.cancel()
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].usage.completion_tokens < 200
    wait_until(lambda: engine.stats().running == 0)
    assert engine._base.blocks.num_free == blocks_free
    assert {r.ref: r.pins for r in engine.residency()}["chat@1"] == 0
    assert engine.stats().requests_finished["cancelled"] == 1


def test_cancel_while_waiting_and_stop_ends_streams(world):
    eng = start_engine(world.home, max_running=1)
    busy = eng.submit(GenerationRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=200)))
    queued = eng.submit(GenerationRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_tokens=5)))
    queued.cancel()
    assert queued.result().finish_reason == "cancelled" and queued.result is not None
    eng.stop_sync()
    assert busy.result().finish_reason == "cancelled"
    with pytest.raises(EngineNotReady):
        eng.submit(GenerationRequest(prompt="x"))


def test_a_request_submitted_as_the_engine_stops_still_ends(world):
    """A submit that passed its readiness check just before stop() queued its admission after the
    loop's last pass: the stream still ends (cancelled) instead of waiting forever."""
    import threading

    eng = start_engine(world.home)
    hold, held = threading.Event(), threading.Event()
    eng._core.post(lambda: (held.set(), hold.wait(10)))  # the loop is inside this command ...
    assert held.wait(10)
    late = eng.submit(GenerationRequest(prompt=PROMPTS[1], sampling=SamplingParams(max_tokens=5)))  # ... queued
    eng._state = "stopping"  # what stop_sync() sets first
    hold.set()
    eng._thread.join(10)
    ended: list = []
    waiter = threading.Thread(target=lambda: ended.append(late.result()), daemon=True)  # without a fix: forever
    waiter.start()
    waiter.join(10)
    assert ended and ended[0].finish_reason == "cancelled"
    with pytest.raises(EngineNotReady, match="not running"):
        eng._core.post(lambda: None)
    eng._state = "ready"
    eng.stop_sync()


def test_bad_requests_get_typed_errors_and_serving_goes_on(engine, world, tmp_path):
    sp = SamplingParams(max_tokens=4)
    with pytest.raises(AdapterNotFound, match="no entry named 'nosuch'"):
        engine.submit(GenerationRequest(prompt="hi", model="nosuch"))
    with pytest.raises(AdapterNotFound, match="no version 9"):
        engine.submit(GenerationRequest(prompt="hi", model="sql@9"))
    with pytest.raises(AdapterNotFound, match="no alias"):
        engine.submit(GenerationRequest(prompt="hi", model="sql@staging"))
    with pytest.raises(PromptTooLong, match="exceeds the context of 256"):
        engine.submit(GenerationRequest(prompt_token_ids=[5] * 250, sampling=SamplingParams(max_tokens=10)))
    with pytest.raises(InvalidRequest, match="max_tokens 5000 is above"):
        engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=5000)))
    for bad, word in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                      (dict(max_tokens=0), "max_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
                      (dict(max_tokens=4, min_tokens=5), "min_tokens")]:
        with pytest.raises(InvalidRequest, match=word):
            engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(**bad)))
    with pytest.raises(InvalidRequest, match="exactly one"):
        engine.submit(GenerationRequest(prompt="hi", messages=[{"role": "user", "content": "x"}]))
    with pytest.raises(InvalidRequest, match="outside"):
        engine.submit(GenerationRequest(prompt_token_ids=[10 ** 6]))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.submit(GenerationRequest(prompt=""))
    # an adapter made for another base
    registry = Registry(world.home)
    other = save_model(tmp_path / "other", seed=9)
    registry.publish(other, name="otherbase", kind="base")
    registry.publish(save_adapter(other, tmp_path / "foreign", AdapterSpec("foreign", 4, ("q_proj",))),
                     name="foreign", kind="adapter", base="otherbase")
    with pytest.raises(IncompatibleAdapter, match="made for base otherbase@1, not for tiny@1"):
        engine.submit(GenerationRequest(prompt="hi", model="foreign"))
    with pytest.raises(IncompatibleAdapter, match="another base"):
        engine.submit(GenerationRequest(prompt="hi", model="otherbase"))
    # refused at load (DoRA without its magnitude vectors): the stream raises the reason; nothing was half-applied
    dora = edit_config(shutil.copytree(world.adapter_dirs["sql"], tmp_path / "dora"), use_dora=True)
    registry.publish(dora, name="dora", kind="adapter", base=BASE)
    stream = engine.submit(GenerationRequest(prompt="hi", model="dora", sampling=sp))
    with pytest.raises(IncompatibleAdapter, match="lora_magnitude_vector is missing"):
        stream.result()
    registry.close()
    ok = engine.generate_sync([GenerationRequest(prompt="hi", model="sql", sampling=sp)])[0]
    assert ok.finish_reason == "length"
    rejected = engine.stats().requests_rejected
    assert rejected["AdapterNotFound"] == 3 and rejected["IncompatibleAdapter"] == 2


def test_queue_full(world):
    eng = start_engine(world.home, max_running=1, max_queue=2)
    try:
        streams = [eng.submit(GenerationRequest(prompt=PROMPTS[i], sampling=SamplingParams(max_tokens=100)))
                   for i in range(2)]
        with pytest.raises(QueueFull, match="max_queue 2"):
            for _ in range(3):
                streams.append(eng.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=100))))
        for s in streams:
            s.cancel()
    finally:
        eng.stop_sync()


def test_engine_not_ready_before_start(world):
    eng = Engine(Registry(world.home), BASE, small_config())
    with pytest.raises(EngineNotReady, match="call start"):
        eng.submit(GenerationRequest(prompt="hi"))
    with pytest.raises(AdapterNotFound):
        Engine(Registry(world.home), "nobase", small_config()).start_sync()


def test_min_tokens_bans_eos_until_reached(engine):
    import torch

    from hotswap.serve.engine.sampler import sample

    eos = engine.tokenizer.eos_token_id
    logits = torch.zeros(2, 10)
    logits[:, eos if eos < 10 else 3] = 5.0
    logits[:, 7] = 4.0
    banned = [frozenset({eos if eos < 10 else 3}), frozenset()]
    assert sample(logits, [SamplingParams()] * 2, [[1], [1]], [None, None], banned) == [7, eos if eos < 10 else 3]
    # in the engine: the ban is applied in every step (greedy, sampled, with an adapter)
    reqs = [GenerationRequest(prompt=PROMPTS[5], model=m, sampling=SamplingParams(max_tokens=6, min_tokens=6, **kw))
            for m, kw in ((None, {}), ("sql", {"temperature": 0.8, "seed": 1}))]
    outs = engine.generate_sync(reqs)
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert all(eos not in o.token_ids for o in outs)


def test_a_failing_step_ends_its_requests_and_serving_goes_on(engine, monkeypatch):
    from hotswap.serve.engine import EngineError

    runner = engine._base.runner
    real = runner.forward
    monkeypatch.setattr(runner, "forward", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    stream = engine.submit(GenerationRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=4)))
    with pytest.raises(EngineError, match="step failed: RuntimeError: boom"):
        stream.result()
    monkeypatch.setattr(runner, "forward", real)
    ok = engine.generate_sync([GenerationRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=4))])[0]
    assert ok.finish_reason == "length" and engine._base.blocks.num_free == engine._base.blocks.num_blocks


def test_a_request_refused_in_a_failing_step_gives_its_adapter_pin_back(engine, monkeypatch):
    """A classification for an adapter without a head is refused once its pin is taken; when the step
    it was refused in fails, the refusal must still give the pin back, or the adapter stays pinned."""
    from hotswap.serve.engine import EngineError

    engine.load_future("sql").result(timeout=30)
    monkeypatch.setattr(engine._base.runner, "forward", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    plain, classify = engine.submit_many([GenerationRequest(prompt=PROMPTS[0]),
                                          GenerationRequest(prompt=PROMPTS[0], model="sql", classify=True)])
    with pytest.raises(EngineError, match="step failed"):
        plain.result()
    with pytest.raises(InvalidRequest, match="no classification head"):
        classify.result()
    assert [(r.ref, r.pins) for r in engine.residency()] == [("sql@1", 0)]


def test_a_request_id_in_use_is_refused_and_cancel_still_reaches_its_request(engine):
    running = engine.submit(GenerationRequest(prompt=PROMPTS[0], request_id="mine",
                                              sampling=SamplingParams(max_tokens=200, ignore_eos=True)))
    next(iter(running))
    again = engine.submit(GenerationRequest(prompt=PROMPTS[1], request_id="mine"))
    with pytest.raises(InvalidRequest, match="request_id 'mine' is taken"):
        again.result()
    running.cancel()
    assert running.result().finish_reason == "cancelled"
    assert engine.generate_sync([GenerationRequest(prompt=PROMPTS[1], request_id="mine",
                                                   sampling=SamplingParams(max_tokens=2))])[0].finish_reason == "length"


def test_cancelling_a_refused_duplicate_leaves_the_request_that_holds_its_id_alone(engine):
    """A duplicate cancelled before its refusal arrives (a client timing out at once, say) must not
    cancel the running request whose request_id it named."""
    running = engine.submit(GenerationRequest(prompt=PROMPTS[0], request_id="mine",
                                              sampling=SamplingParams(max_tokens=40, ignore_eos=True)))
    next(iter(running))
    again = engine.submit(GenerationRequest(prompt=PROMPTS[1], request_id="mine"))
    again.cancel()  # posted after its admission, which refuses it
    with pytest.raises(InvalidRequest, match="request_id 'mine' is taken"):
        again.result()
    assert running.result().finish_reason == "length"


def test_a_dead_engine_loop_ends_streams_and_reports_not_ready(engine, monkeypatch):
    from hotswap.serve.engine import EngineError

    running = engine.submit(GenerationRequest(prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=200)))

    def broken() -> None:
        raise RuntimeError("gauges broke")
    monkeypatch.setattr(engine._core, "_gauges", broken)  # outside the guarded step: kills the loop
    with pytest.raises(EngineError, match="engine loop died: RuntimeError: gauges broke"):
        running.result()
    assert not engine.ready
    with pytest.raises(EngineNotReady, match="failed .*gauges broke"):
        engine.submit(GenerationRequest(prompt="hi"))
    engine.cancel(running.request_id)  # a no-op now, not an error
    engine.stop_sync()
    assert not engine.ready


def test_a_tampered_adapter_file_is_refused_on_load(world, tmp_path):
    """A changed blob is re-hashed when the engine opens it, and refused with the file named."""
    import os

    from hotswap.serve.engine import EngineError

    home = tmp_path / "home"
    shutil.copytree(world.home, home)
    registry = Registry(home)
    sha = next(s for p, s, _ in registry.files("sql") if p == "adapter_model.safetensors")
    blob = registry.blobs.path(sha)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    registry.close()
    eng = start_engine(home)
    try:
        stream = eng.submit(GenerationRequest(prompt=PROMPTS[0], model="sql", sampling=SamplingParams(max_tokens=2)))
        with pytest.raises(EngineError, match=r"sql@1: file adapter_model\.safetensors: blob \w+ is corrupt"):
            stream.result()
        ok = eng.generate_sync([GenerationRequest(prompt=PROMPTS[0], model="chat", sampling=SamplingParams(max_tokens=2))])
        assert ok[0].finish_reason == "length"
    finally:
        eng.stop_sync()
